"""Throughput of the batch routing job (routing only) on the 5,989 prompts of llmrouter_9model, against a bare encode.

    python benchmarks/bench_batch.py [--artifact artifacts/llmrouter_9model] [--batch-size 256] [other job flags, e.g. --actors 2]

Writes the prompts to a Parquet file and runs `python -m serve.batch` on it as a user would, watching the output
folder for part files. It reports
- the whole job's prompts/s (Ray start, actor start and encoder load included);
- the start-up: seconds until the first part file appears (its rows routed included);
- the steady state: the rows of every later part over the seconds from the first part to the last;
- a bare encode of the same prompts in this process, in calls of the job's batch size, with one torch thread and
  with as many as the machine has cores: the job's ceiling is the faster of the two (on a busy machine threads
  that wait on each other can be the slower), measured in the same run because a shared machine's other work
  slows both. The goal is a steady state of at least 0.8x that ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.8
PART = re.compile(r"part-(\d+)-(\d+)\.parquet")


def run_job(command: list[str], output: Path) -> tuple[float, list[tuple[float, int]]]:
    """Run the job; (its seconds, [(seconds since the start, rows) for each part file, in the order they appeared])."""
    seen: dict[str, tuple[float, int]] = {}
    done = threading.Event()

    def note_new_parts(seconds: float) -> None:
        for path in output.glob("part-*.parquet") if output.exists() else ():
            if path.name not in seen and (match := PART.fullmatch(path.name)):
                seen[path.name] = (seconds, int(match[2]) - int(match[1]))

    def watch() -> None:
        while not done.wait(0.1):
            note_new_parts(time.perf_counter() - started)

    started = time.perf_counter()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # A Ray of its own (RAY_ADDRESS=local), never one that another program left running on the machine.
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        seconds = time.perf_counter() - started
        done.set()
        watcher.join()
    note_new_parts(seconds)  # a part written in the last tenth of a second
    return seconds, sorted(seen.values())


def bare_encode_seconds(encoder, prompts: list[str], call_size: int, threads: int) -> float:
    import torch

    from serve.core.encoder import encode

    torch.set_num_threads(threads)
    encode(encoder, prompts[:16])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(prompts), call_size):
        encode(encoder, prompts[start:start + call_size])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=str(REPO / "artifacts" / "llmrouter_9model"))
    parser.add_argument("--dataset", default="llmrouter_9model")
    parser.add_argument("--batch-size", type=int, default=256, help="the job's --batch-size, and the bare encode's call size")
    args, job_flags = parser.parse_known_args()

    from serve.core.artifact import RouterArtifact
    from serve.core.encoder import load_encoder
    from training.datasets import load_dataset

    prompts = list(load_dataset(args.dataset).prompts)
    with tempfile.TemporaryDirectory() as work:
        source, output = Path(work) / "prompts.parquet", Path(work) / "routed"
        pd.DataFrame({"row": range(len(prompts)), "prompt": prompts}).to_parquet(source)
        load_before = os.getloadavg()
        command = [sys.executable, "-m", "serve.batch", "--artifact", args.artifact, "--input", str(source), "--output", str(output),
                   "--batch-size", str(args.batch_size), *job_flags]
        seconds, parts = run_job(command, output)
    if sum(rows for _, rows in parts) != len(prompts):
        raise SystemExit(f"the job wrote {sum(rows for _, rows in parts)} rows for {len(prompts)} prompts")
    load_between = os.getloadavg()
    encoder = load_encoder(RouterArtifact.load(args.artifact).embedder, device="cpu")
    bare_by_threads = {threads: len(prompts) / bare_encode_seconds(encoder, prompts, args.batch_size, threads)
                       for threads in sorted({1, os.cpu_count()})}
    bare = max(bare_by_threads.values())
    (first_part_s, _), (last_part_s, _) = parts[0], parts[-1]
    steady = sum(rows for _, rows in parts[1:]) / (last_part_s - first_part_s) if len(parts) > 1 else float("nan")
    print(json.dumps({
        "prompts": len(prompts), "batch_size": args.batch_size, "job_flags": job_flags, "cpus": os.cpu_count(),
        "job_s": round(seconds, 1), "job_prompts_per_s": round(len(prompts) / seconds, 1),
        "startup_s": round(first_part_s, 1), "steady_prompts_per_s": round(steady, 1), "parts": len(parts),
        "bare_encode_prompts_per_s_by_threads": {threads: round(rate, 1) for threads, rate in bare_by_threads.items()},
        "steady_vs_bare": round(steady / bare, 2), "job_vs_bare": round(len(prompts) / seconds / bare, 2),
        "load_avg_1m": [round(load_before[0], 2), round(load_between[0], 2), round(os.getloadavg()[0], 2)],
    }))
    print(f"steady state {steady / bare:.2f}x the bare encode (goal >= {GOAL}x: {'met' if steady / bare >= GOAL else 'missed'}); "
          f"whole job {len(prompts) / seconds / bare:.2f}x, of which {first_part_s:.1f} s before the first part")


if __name__ == "__main__":
    main()
