"""The deploy/ recipes render and hold what lamina needs (no SLURM or Kubernetes needed to check them)."""

import importlib.util
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _slurm():
    spec = importlib.util.spec_from_file_location("lamina_slurm", DEPLOY / "slurm" / "lamina_slurm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_slurm_job_script_runs_single_threaded_workers(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    monkeypatch.chdir(tmp_path)
    cluster = _slurm().make_cluster(
        queue="normal", account="lab", cores=8, memory="32GiB", walltime="02:00:00", python_env="/opt/venv"
    )
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in (
        "#SBATCH -p normal",
        "#SBATCH -A lab",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH -t 02:00:00",
        "source /opt/venv/bin/activate",
        "OMP_NUM_THREADS=1",
    ):
        assert line in script, line
    assert "--nthreads 1" in script and "--nworkers 8" in script and "--memory-limit 4.00GiB" in script
    assert "python -m distributed.cli.dask_worker tcp://" in script


def test_slurm_tls_recipe_encrypts_worker_connections(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    pytest.importorskip("cryptography")
    from distributed.security import Security

    monkeypatch.chdir(tmp_path)  # dask-jobqueue writes the temporary certificates into the working directory
    cluster = _slurm().make_cluster(cores=2, memory="4GiB", security=Security.temporary())
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "dask_worker tls://" in script and "--tls-ca-file" in script and "--protocol tls://" in script


def test_kubernetes_daskcluster_manifest_is_complete():
    doc = yaml.safe_load((DEPLOY / "kubernetes" / "daskcluster.yaml").read_text())
    assert doc["apiVersion"] == "kubernetes.dask.org/v1" and doc["kind"] == "DaskCluster"
    name = doc["metadata"]["name"]
    worker = doc["spec"]["worker"]
    assert worker["replicas"] >= 1
    w = worker["spec"]["containers"][0]
    assert w["args"][:2] == ["dask", "worker"] and w["args"][w["args"].index("--nthreads") + 1] == "1"
    assert "$(DASK_WORKER_NAME)" in w["args"]  # set by the operator, one per pod
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in w["env"]
    volumes = {v["name"] for v in worker["spec"]["volumes"]}
    assert {m["name"] for m in w["volumeMounts"]} <= volumes  # the store is on a volume every worker mounts
    sched = doc["spec"]["scheduler"]
    s = sched["spec"]["containers"][0]
    assert s["args"] == ["dask", "scheduler"] and s["image"] == w["image"]
    ports = {p["name"]: p["containerPort"] for p in s["ports"]}
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    svc = sched["service"]
    assert svc["type"] == "ClusterIP"  # not exposed outside the cluster by default
    assert svc["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    assert {p["targetPort"] for p in svc["ports"]} <= set(ports)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_container_recipes_install_this_project(name):
    text = (DEPLOY / "docker" / name).read_text()
    assert "COPY engine engine" in text and "COPY kernels kernels" in text and "COPY pyproject.toml" in text
    torch_at, project_at = (
        text.index("torch==2.13.0"),
        text.index('install ".[gpu]"' if "cuda" in name else "install ."),
    )
    assert torch_at < project_at  # the pinned torch first, so pip does not choose one
    assert "USER lamina" in text  # workers do not run as root


def test_kubernetes_manifest_validates_against_the_operator_crd_schema():
    """The DaskCluster CRD shipped in the dask-kubernetes wheel (the ``deploy`` extra) is the schema the API
    server enforces; a manifest that does not validate would be rejected by ``kubectl apply``."""
    resources = pytest.importorskip("importlib.resources")
    pytest.importorskip("dask_kubernetes", reason="the deploy extra (dask-kubernetes) is not installed")
    jsonschema = pytest.importorskip("jsonschema")
    crd_file = (
        resources.files("dask_kubernetes") / "operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml"
    )
    crd = yaml.safe_load(crd_file.read_text())
    doc = yaml.safe_load((DEPLOY / "kubernetes" / "daskcluster.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if doc["apiVersion"].endswith("/" + v["name"]))
    assert doc["kind"] == crd["spec"]["names"]["kind"]
    validator = jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])
    assert [e.message for e in validator.iter_errors(doc)] == []
    doc["spec"]["worker"]["replicas"] = "two"  # the check has teeth
    assert any("not of type 'integer'" in e.message for e in validator.iter_errors(doc))
