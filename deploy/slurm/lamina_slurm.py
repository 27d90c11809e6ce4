"""Run `lamina build` on a SLURM cluster: dask-jobqueue submits the worker jobs, this process is the client.

    pip install "lamina[deploy]"            # dask-jobqueue
    python deploy/slurm/lamina_slurm.py atlas.yaml --jobs 8 --queue normal --account mylab

Each SLURM job runs ``processes`` single-threaded Dask workers (torch threads = 1 per worker thread, which is
what lamina's kernels want). The store and inputs must be on a filesystem every node mounts (e.g. /scratch).
``--print-job-script`` only prints the sbatch script that would be submitted.
"""

from __future__ import annotations

import argparse
import sys


def make_cluster(
    queue: str | None = None,
    account: str | None = None,
    cores: int = 8,
    memory: str = "32GiB",
    walltime: str = "04:00:00",
    local_directory: str = "$TMPDIR",
    python_env: str | None = None,
    interface: str | None = None,
    security=None,
):
    """A ``dask_jobqueue.SLURMCluster`` sized for lamina: one worker process per core, one thread each."""
    from dask_jobqueue import SLURMCluster

    prologue = [f"source {python_env}/bin/activate"] if python_env else []
    prologue += ["export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1"]
    return SLURMCluster(
        queue=queue,
        account=account,
        cores=cores,
        processes=cores,
        memory=memory,
        walltime=walltime,
        local_directory=local_directory,
        interface=interface,
        job_script_prologue=prologue,
        security=security,
        python="python" if python_env else None,
        scheduler_options={"dashboard_address": "127.0.0.1:8787"},
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?")
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--queue")
    p.add_argument("--account")
    p.add_argument("--cores", type=int, default=8)
    p.add_argument("--memory", default="32GiB")
    p.add_argument("--walltime", default="04:00:00")
    p.add_argument("--python-env", help="virtualenv / conda prefix to activate on the nodes")
    p.add_argument("--interface", help="network interface of the nodes (e.g. ib0)")
    p.add_argument(
        "--tls",
        action="store_true",
        help="encrypt and authenticate every connection (a temporary "
        "self-signed certificate, shared with the jobs through their job script)",
    )
    p.add_argument("--print-job-script", action="store_true")
    args = p.parse_args(argv)
    security = None
    if args.tls:
        from distributed.security import Security

        security = Security.temporary()
    cluster = make_cluster(
        args.queue,
        args.account,
        args.cores,
        args.memory,
        args.walltime,
        python_env=args.python_env,
        interface=args.interface,
        security=security,
    )
    if args.print_job_script:
        print(cluster.job_script())
        cluster.close()
        return 0
    if not args.config:
        p.error("a build config is needed (or --print-job-script)")
    from lamina.cli import main as lamina_main

    cluster.scale(jobs=args.jobs)
    try:
        if security is not None:  # the client needs the same certificate as the cluster
            import dask

            dask.config.set(
                {
                    "distributed.comm.tls.ca-file": security.tls_ca_file,
                    "distributed.comm.tls.client.cert": security.tls_client_cert,
                    "distributed.comm.require-encryption": True,
                }
            )
        return lamina_main(["build", args.config, "--scheduler", cluster.scheduler_address])
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
