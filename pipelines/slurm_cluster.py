"""Start Dask workers as SLURM jobs (dask-jobqueue) and keep them up; print the scheduler address.

    pip install 'wsi_mil[distributed,slurm]'
    python pipelines/slurm_cluster.py --jobqueue configs/dask/jobqueue.yaml --jobs 4
    wsi-mil extract --slides ... --out ... --config configs/slurm.yaml --dask-address tcp://HOST:PORT
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobqueue", type=Path, default=Path("configs/dask/jobqueue.yaml"))
    ap.add_argument("--jobs", type=int, default=2, help="SLURM jobs (= Dask workers) to start")
    args = ap.parse_args()
    try:
        import dask
        from dask_jobqueue import SLURMCluster
    except ImportError:
        print("error: needs dask-jobqueue: pip install 'wsi_mil[distributed,slurm]'", file=sys.stderr)
        return 2
    dask.config.update(dask.config.config, yaml.safe_load(args.jobqueue.read_text()), priority="new")
    cluster = SLURMCluster()
    cluster.scale(jobs=args.jobs)
    print(f"scheduler: {cluster.scheduler_address}\n--dask-address {cluster.scheduler_address}", flush=True)
    print(cluster.job_script())
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
