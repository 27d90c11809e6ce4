import logging
import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(os.environ.get("LAMINA_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()


def _gpu_usable() -> bool:
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    try:
        import cupy

        return bool(cupy.is_available())
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_usable():
        return
    skip = pytest.mark.skip(reason="no usable CUDA device (torch.cuda / cupy report none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir():
    return DATA


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not present: {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def small_phantom():
    import lamina

    return lamina.datasets.phantom(n_cells=6000, n_sections=5, n_genes=24, seed=3, chunk_rows=700)


@pytest.fixture(scope="session")
def phantom_store(tmp_path_factory, small_phantom):
    """A small ingested phantom (read-only for tests: copy it before changing it)."""
    import lamina

    path = tmp_path_factory.mktemp("ph") / "ph.lamina.zarr"
    return lamina.ingest(small_phantom, path, cell_chunk=1024)


@pytest.fixture(scope="session")
def phantom_table(small_phantom):
    """The phantom's full observed table in generation order, plus true xyz (small: fine in memory)."""
    import pandas as pd

    frames, truth = [], []
    for s in range(small_phantom.spec.n_sections):
        for f, xyz in small_phantom.section_chunks(s):
            frames.append(f)
            truth.append(xyz)
    return pd.concat(frames, ignore_index=True), np.concatenate(truth)


def tree_digest(path: Path) -> dict:
    """Relative file path -> (size, bytes hash) for every file under ``path``."""
    import hashlib

    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(path).rglob("*"))
        if p.is_file()
    }


def interrupt_training(monkeypatch, at_step: int | None, calls: list | None = None):
    """Wrap train_flow's training block: the block starting at step ``at_step`` raises ``KeyboardInterrupt`` (a
    run killed mid-training; None: none does) and every block's start step is appended to ``calls``. Returns
    the real block function, to put back with ``monkeypatch.setattr``."""
    from lamina.stages import flow as flow_stage

    real = flow_stage._train_block

    def block(store, ckpt, cfg, sec, a, b):
        if calls is not None:
            calls.append(a)
        if a == at_step:
            raise KeyboardInterrupt("killed mid-training")
        return real(store, ckpt, cfg, sec, a, b)

    monkeypatch.setattr(flow_stage, "_train_block", block)
    return real


@pytest.fixture(autouse=True)
def _lamina_logger():
    """Restore lamina's logger after each test: ``lamina.cli.main`` run in-process gives it its own stderr handler
    and stops it propagating, and a later test reading ``caplog`` would see nothing."""
    log = logging.getLogger("lamina")
    propagate, level, handlers = log.propagate, log.level, list(log.handlers)
    yield
    log.propagate, log.handlers[:] = propagate, handlers
    log.setLevel(level)
