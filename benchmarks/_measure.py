"""Wall time and the peak RSS of a whole process tree (Dask workers included), sampled in a thread."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil


def tree_rss(pid: int) -> int:
    """Summed RSS (bytes) of process ``pid`` and all its descendants; 0 once it has gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakRSS:
    """``with PeakRSS(pid) as m: ...`` -> ``m.peak``: the largest :func:`tree_rss` seen every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = tree_rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))
        return False


def run_measured(cmd: list[str], interval: float = 0.05, env=None) -> dict:
    """Wall seconds and peak summed RSS (bytes) of ``cmd`` and all its descendants (Dask workers included)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with PeakRSS(proc.pid, interval) as m:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss": m.peak, "stdout": out, "stderr": err}


def child_result(measured: dict) -> dict:
    """The JSON a benchmark's child process printed on its last ``RESULT `` line (see :func:`run_measured`)."""
    import json

    return json.loads([ln for ln in measured["stdout"].splitlines() if ln.startswith("RESULT ")][-1][7:])
