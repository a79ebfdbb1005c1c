"""Label your own traffic: sample a prompt log, ask every pool model, judge every answer, write the routing table
that `python -m training fit --dataset` reads (`job`). The judges (`judges`) and the sampler (`sampling`) are plain
functions that onboarding and the judge validation (`routerbench`) call too; the pool file is read by `pool`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True, help="the prompt log: a .parquet or .jsonl file or folder (local path or URI)")
    parser.add_argument("--pool", required=True, help="the pool file (YAML; see training/labelling/pool.py and docs/own_pool.md)")
    parser.add_argument("--out", required=True, help="the output folder (part files, labels.jsonl); empty unless --resume")
    parser.add_argument("--budget", type=int, help="prompts to label (default: every row of the log)")
    parser.add_argument("--artifact", help="a trained router: sample stratified over its latent tasks (default: uniform)")
    parser.add_argument("--floor", type=int, default=5, help="with --artifact: labels per latent task at least (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--reference-column", default="reference", help="the expected answer, where the log has one")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per block")
    parser.add_argument("--resume", action="store_true", help="finish the job that wrote --out (same arguments)")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume: also ask again for the rows that failed")


