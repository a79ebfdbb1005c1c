"""Batch routing: a Ray Data job that routes every prompt of a Parquet or JSON Lines dataset.

    python -m serve.batch --artifact DIR --input PATH --output DIR [--preset balanced] [--generate --endpoint URL] [--resume]

It writes one output row per input row: the input's columns, plus the decision (`routed_model`,
`ranked_models`, `predicted_quality`, `estimated_cost_usd`, `task`, `task_probability`). Decisions come
from `RouterArtifact.route`, the rule the evaluation harness and the Ranker deployment call, so what is
batch-routed is what was evaluated. With `--generate`, an OpenAI-compatible endpoint (the running router
app, or any vLLM server) answers each prompt with its routed model; the served app already holds the
engines, so the job does not start its own. Paths may be local or any URI pyarrow reads (s3://, gs://).
After a crash, the same command with `--resume` writes only the rows that are missing.

Modules: `inputs` (checks and row ranges), `ranking` and `answers` (the two Ray Data stages), `output` (part
files and resume), `cli` (the pipeline and the command line).
"""
