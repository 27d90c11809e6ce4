"""Dask cluster: ``connect()`` and the one place where graphs are computed (``compute``)."""

from __future__ import annotations

import logging
import os
import sys
import time

import dask
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_client

from .errors import ClusterError

log = logging.getLogger("lamina")
_PROGRESS = {"on": False}


def set_progress(on: bool) -> None:
    """Show text progress bars for computations (the CLI turns this on when stderr is a terminal)."""
    _PROGRESS["on"] = bool(on)


class _DropComputeFailed(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith("Compute Failed")


class WorkerSetup(WorkerPlugin):
    """Per-worker settings lamina relies on.

    * torch intra-op threads = ``threads``: each worker thread runs one task at a time; a task that calls
      torch would otherwise start one OpenMP thread per core, and N worker threads x N cores threads make
      torch-in-Dask several times slower.
    * glibc's malloc keeps blocks up to 32 MiB on its heap (:func:`_heap_allocations`).
    * the worker's "Compute Failed" log of a task error is dropped: the client re-raises the same error
      with its traceback, and for bad input the message is the whole story (the CLI prints just that).
    """

    name = "lamina-worker-setup"

    def __init__(self, threads: int = 1):
        self.threads = int(threads)

    def setup(self, worker):
        threads_for_torch(self.threads)
        _heap_allocations()
        logging.getLogger("distributed.worker").addFilter(_DropComputeFailed())


def threads_for_torch(threads: int) -> None:
    """Torch's intra-op threads = ``threads`` in this process, without importing torch when nothing has: torch
    reads ``OMP_NUM_THREADS`` when it starts (importing it here would add ~2 s to every worker's start)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))
    else:
        os.environ["OMP_NUM_THREADS"] = str(int(threads))


def _heap_allocations(mmap_max: int = 32 * 2**20, trim: int = 64 * 2**20) -> bool:
    """Let glibc serve allocations below ``mmap_max`` bytes from its heap and keep up to ``trim`` bytes of
    free heap, the ceilings its own adaptive thresholds would reach; True when applied (glibc only).

    Why: Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that they hand memory back to
    the OS. Setting any threshold switches glibc's adaptive thresholds off, so every block above 128 KiB
    (each raster, field or gradient tensor of a registration step) is a fresh ``mmap``: page faults on
    every allocation. Measured on the affine registration of one DLPFC pair: 2.7 s per pair in a worker
    against 1.2 s in a plain process; 1.2-1.3 s again with these settings. Blocks above ``mmap_max``
    (cell chunks, volumes) still go straight back to the OS when freed.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # musl and other C libraries have no mallopt
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_max)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))


def task_device():
    """The torch device for the work of the running task.

    ``LAMINA_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``) decides when set; otherwise the GPU when torch sees
    one, else the CPU. On a dask-cuda worker each process sees only its own GPU (``CUDA_VISIBLE_DEVICES``
    is set per worker), so ``cuda`` is that worker's device; torch's caching allocator then draws from the
    RMM pool when ``connect(gpu=True)`` set it up. Outputs go back to NumPy on the CPU before they are
    written, so results do not depend on where a task ran beyond floating-point rounding (and the random
    streams of seeded noise, which differ between CPU and CUDA generators).
    """
    import torch

    forced = os.environ.get("LAMINA_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_layout(cores: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) for this machine: processes for the GIL-bound parts, 1-2 threads each."""
    cores = cores or _cores()
    threads = 1 if cores <= 4 else 2
    return max(1, cores // threads), threads


class LaminaClient(Client):
    """A ``distributed.Client`` that shuts down the local cluster :func:`connect` started for it when it is
    closed, by ``close()`` or by leaving ``with lamina.connect() as client:``."""

    owned_cluster = None

    @classmethod
    def owning(cls, cluster) -> LaminaClient:
        """A client of ``cluster`` that closes it when the client closes."""
        client = cls(cluster)
        client.owned_cluster = cluster
        return client

    def close(self, *args, **kwargs):
        cluster, self.owned_cluster = self.owned_cluster, None
        try:
            return super().close(*args, **kwargs)
        finally:
            if cluster is not None:
                cluster.close()


def connect(
    address: str | None = None,
    gpu: bool | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int = "auto",
    dashboard_address: str | None = "127.0.0.1:0",
    processes: bool = True,
    timeout: float = 30.0,
) -> Client:
    """A ``distributed.Client`` for lamina's stages.

    * ``address`` given: connect to that scheduler (``tcp://host:port``), nothing is started.
    * ``gpu=True``: a ``dask_cuda.LocalCUDACluster`` (one worker per GPU); a clear error when there is no
      usable GPU or dask-cuda is not installed (``pip install lamina[gpu]``).
    * otherwise: a ``LocalCluster`` of worker processes sized to this machine, scheduler and dashboard bound
      to 127.0.0.1 (pass ``dashboard_address="0.0.0.0:8787"`` to expose the dashboard on purpose).

    Every worker gets torch threads = 1 per worker thread (:class:`WorkerSetup`). Closing the client (or
    leaving ``with lamina.connect() as client:``) also shuts down a cluster started here. For a small atlas no
    cluster is faster: without a client, stages run on threads in this process (:class:`Resources`).
    """
    if address:
        try:
            client = Client(address, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cannot reach a Dask scheduler at {address}: {exc}; start one with "
                f"`dask scheduler` and workers with `dask worker {address}`, or omit --scheduler "
                f"to use a local cluster"
            ) from exc
    elif gpu:
        client = _connect_gpu(n_workers, memory_limit, dashboard_address)
    else:
        auto_workers, auto_threads = default_layout()
        cluster = LocalCluster(
            n_workers=n_workers or auto_workers,
            threads_per_worker=threads_per_worker or auto_threads,
            processes=processes,
            memory_limit=memory_limit,
            host="127.0.0.1",
            dashboard_address=dashboard_address,
        )
        client = LaminaClient.owning(cluster)
    client.register_plugin(WorkerSetup(1))
    link = getattr(client, "dashboard_link", None)
    if link:
        log.info("Dask dashboard: %s", link)
    return client


def _connect_gpu(n_workers, memory_limit, dashboard_address) -> Client:
    usable = False
    try:
        import torch

        usable = torch.cuda.is_available()
    except ImportError:
        pass
    if not usable:
        try:
            import cupy

            usable = cupy.is_available()
        except ImportError:
            pass
    if not usable:
        raise ClusterError(
            "gpu=True but no usable CUDA device was found (torch.cuda.is_available() and "
            "cupy.is_available() are both false); run without --gpu to use CPU workers"
        )
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ClusterError("gpu=True needs dask-cuda: pip install 'lamina[gpu]'") from exc
    cluster = LocalCUDACluster(
        n_workers=n_workers,
        memory_limit=memory_limit,
        ip="127.0.0.1",
        dashboard_address=dashboard_address,
        rmm_pool_size="0.5",
        rmm_allocator_external_lib_list=["cupy", "torch"],
    )
    return LaminaClient.owning(cluster)


#: Below this many cells the CLI computes on threads in its own process: starting worker processes (each
#: importing torch) costs more than a small atlas' whole build.
THREADS_BELOW_CELLS = 1_000_000
#: Inputs smaller than this are ingested on threads too (the atlas' size is known only after ingest).
THREADS_BELOW_INPUT_BYTES = 256 * 2**20
MODES = ("auto", "threads", "processes")


class Resources:
    """Where one CLI run computes: ``mode`` ``threads`` (this process), ``processes`` (a cluster from
    :func:`connect`), or ``auto``: threads for atlases under :data:`THREADS_BELOW_CELLS` cells, a cluster
    above; a scheduler address or ``gpu`` always means a cluster. The cluster starts when first needed and
    :meth:`close` shuts it down."""

    def __init__(self, mode: str = "auto", threads_below: int = THREADS_BELOW_CELLS, **connect_kwargs):
        if mode not in MODES:
            raise ClusterError(f"cluster mode {mode!r}: choose one of {', '.join(MODES)}")
        if connect_kwargs.get("address") or connect_kwargs.get("gpu"):
            mode = "processes"
        self.mode, self.threads_below, self.kwargs = mode, int(threads_below), connect_kwargs
        self.client: Client | None = None

    def wants_cluster(self, n_cells: int | None = None, input_bytes: int | None = None) -> bool:
        if self.mode != "auto":
            return self.mode == "processes"
        if n_cells is not None:
            return n_cells >= self.threads_below
        return input_bytes is None or input_bytes >= THREADS_BELOW_INPUT_BYTES

    def client_for(self, n_cells: int | None = None, input_bytes: int | None = None) -> Client | None:
        """The client to compute a job of this size on; None: threads in this process."""
        if self.client is None and self.wants_cluster(n_cells, input_bytes):
            self.client = connect(**self.kwargs)
            link = getattr(self.client, "dashboard_link", None)
            log.info(
                "dask: cluster of %d worker(s)%s",
                len(self.client.scheduler_info()["workers"]),
                f", dashboard {link}" if link else "",
            )
        if self.client is None:
            threads_for_torch(1)  # each of dask's threads runs one task; torch must not start more per task
            _heap_allocations()
        return self.client

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def active_client(client: Client | None = None) -> Client | None:
    """The client to compute on: the one given, else the current default client, else None (threads)."""
    if client is not None:
        return client
    try:
        return get_client()
    except ValueError:
        return None


def even_batches(items, batch: int) -> list:
    """``items`` split in order into ``ceil(len / batch)`` batches whose sizes differ by at most one.

    Only the items and ``batch`` decide the split, never the cluster: a batched fit is not bit-identical to
    the same fits one by one (sums run in another order), and a build must give the same result on any
    number of workers, also after losing one."""
    items = list(items)
    if not items:
        return []
    n = -(-len(items) // max(1, int(batch)))
    q, r = divmod(len(items), n)
    bounds = [i * q + min(i, r) for i in range(n + 1)]
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def compute(*collections, client: Client | None = None, label: str = "lamina"):
    """Compute dask collections together on ``client`` (or the default client / local threads).

    With progress bars on (:func:`set_progress`) a bar named ``label`` (the stage) counts the collections as
    they finish; the debug log gets one line per call. Returns a tuple of results.
    """
    client = active_client(client)
    t0 = time.perf_counter()
    if client is None:
        out = dask.compute(*collections, scheduler="threads")
    else:
        futures = client.compute(list(collections))
        if _PROGRESS["on"] and len(futures) > 1:
            from tqdm.auto import tqdm

            with tqdm(total=len(futures), desc=label, unit="task", leave=False) as bar:
                for _ in as_completed(futures):
                    bar.update(1)
        out = tuple(client.gather(futures))
    log.debug("%s: computed %d task group(s) in %.2f s", label, len(collections), time.perf_counter() - t0)
    return out
