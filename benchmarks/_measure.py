"""Run a command in a subprocess and record wall time and the peak RSS of its whole process tree."""
from __future__ import annotations

import subprocess
import threading
import time

import psutil


def run_measured(cmd: list[str], interval: float = 0.05, env=None) -> dict:
    """Wall seconds and peak summed RSS (bytes) of ``cmd`` and all its descendants (Dask workers included)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"rss": 0}
    stop = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peak["rss"] = max(peak["rss"], rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak["rss"], "stdout": out, "stderr": err}
