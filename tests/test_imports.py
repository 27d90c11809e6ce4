"""Every module imports on a fresh install, and the light entry points stay light."""

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lamina
import lamina.kernels

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    {m.name for pkg in (lamina, lamina.kernels) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")}
)


def test_the_walk_finds_the_packages():
    assert len(MODULES) >= 50
    assert {"lamina.stages.registration", "lamina.maps", "lamina.kernels.lddmm", "lamina.store.elements"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


@pytest.mark.parametrize(
    "code",
    [
        "import lamina",
        "import lamina.cli as c\ntry:\n    c.main(['--version'])\nexcept SystemExit:\n    pass",
        "import lamina\nlamina.stages.registry.all_stages()",  # the registry lists the stages without torch
        "import lamina\nlamina.config",
    ],
)
def test_light_entry_points_do_not_import_torch(code):
    probe = code + "\nimport sys\nprint('torch' in sys.modules, 'distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    torch_loaded, distributed_loaded = out.stdout.split()[-2:]
    assert torch_loaded == "False", code
    if code == "import lamina" or "--version" in code:
        assert distributed_loaded == "False", code


def test_no_assert_statements_guard_invariants_in_the_packages():
    """``python -O`` drops asserts: invariants use lamina.errors.ensure, input checks raise LaminaErrors."""
    found = []
    for folder in ("engine", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Assert):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if (
                    isinstance(node, ast.Raise)
                    and isinstance(node.exc, ast.Call)
                    and getattr(node.exc.func, "id", "") == "AssertionError"
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} (raise AssertionError)")
    assert not found, found


def test_every_import_of_the_project_is_declared():
    """The hook that CI runs: no third-party import of engine/, kernels/ or benchmarks/ is missing from
    pyproject.toml (benchmark-only libraries belong to the bench extra)."""
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = " ".join(meta["dependencies"] + [d for v in meta["optional-dependencies"].values() for d in v])
    # import name -> distribution name where they differ
    dist = {
        "yaml": "pyyaml",
        "sklearn": "scikit-learn",
        "paste": "paste-bio",
        "ot": "pot",
        "STalign": "stalign-modern",
        "dask_cuda": "dask-cuda",
        "cupy": "cupy-cuda12x",
        "dask_jobqueue": "dask-jobqueue",
        "dask_kubernetes": "dask-kubernetes",
    }
    local = {"lamina", "conftest"} | {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    # a benchmark script that runs in its own environment declares it beside itself (X.requirements.txt)
    own_env = {
        p.name.removesuffix(".requirements.txt") + ".py": p.read_text().lower()
        for p in (ROOT / "benchmarks").glob("*.requirements.txt")
    }
    dist.update(
        {
            "banksy": "pybanksy",
            "banksy_utils": "pybanksy",
            "STAGATE_pyG": "stagate-modern",
            "GraphST": "graphst-modern",
            "torch_geometric": "torch-geometric",
            "TESLA": "teslaforst",
            "cv2": "opencv-python-headless",
        }
    )
    missing = []
    for folder in ("engine", "kernels", "benchmarks", "deploy"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    top = m.split(".")[0]
                    if top in sys.stdlib_module_names or top in local or top.startswith("_"):
                        continue
                    name = dist.get(top, top).lower().replace("_", "-")
                    if path.name in own_env and path.parent.name == "benchmarks":
                        if name not in own_env[path.name] and name not in ("numpy", "pandas", "torch", "anndata"):
                            missing.append(f"{top} ({path.relative_to(ROOT)}:{node.lineno}, own environment)")
                        continue
                    if name not in declared.lower():
                        missing.append(f"{top} ({path.relative_to(ROOT)}:{node.lineno})")
    assert not missing, missing
