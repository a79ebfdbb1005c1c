"""Throughput of the batch routing job (routing only) on the 5,989 prompts of llmrouter_9model.

    python benchmarks/bench_batch.py [--artifact artifacts/llmrouter_9model] [job flags, e.g. --actors 2 --batch-size 512]

Writes the prompts to a Parquet file, runs `python -m serve.batch` on it as a user would, and reports
prompts/s over the whole job (Ray start, actor start and encoder load included), with the machine's load
average before and after, since a shared machine's other work slows the job.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=str(REPO / "artifacts" / "llmrouter_9model"))
    parser.add_argument("--dataset", default="llmrouter_9model")
    args, job_flags = parser.parse_known_args()

    from training.datasets import load_dataset

    prompts = load_dataset(args.dataset).prompts
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "prompts.parquet"
        pd.DataFrame({"row": range(len(prompts)), "prompt": prompts}).to_parquet(source)
        load_before = os.getloadavg()
        started = time.perf_counter()
        command = [sys.executable, "-m", "serve.batch", "--artifact", args.artifact, "--input", str(source), "--output", f"{work}/routed", *job_flags]
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        rows = sum(pq.ParquetFile(path).metadata.num_rows for path in Path(work, "routed").glob("*.parquet"))
    if rows != len(prompts):
        raise SystemExit(f"the job wrote {rows} rows for {len(prompts)} prompts")
    print(json.dumps({
        "prompts": len(prompts), "job_flags": job_flags, "seconds": round(seconds, 1), "prompts_per_s": round(len(prompts) / seconds, 1),
        "cpus": os.cpu_count(), "load_avg_1m_before": round(load_before[0], 2), "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
