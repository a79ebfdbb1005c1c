"""Batch routing: a Ray Data job that routes every prompt of a Parquet or JSON Lines dataset.

    python -m serve.batch --artifact DIR --input PATH --output DIR [--preset balanced] [--generate --endpoint URL
                          [--policy cascade]] [--resume]

It writes one output row per input row: the input's columns, plus the decision (`routed_model`,
`ranked_models`, `predicted_quality`, `estimated_cost_usd`, `task`, `task_probability`). Decisions come
from `RouterArtifact.route`, the rule the evaluation harness and the Ranker deployment call, so what is
batch-routed is what was evaluated. With `--generate`, an OpenAI-compatible endpoint (the running router
app, or any vLLM server) answers each prompt with its routed model; the served app already holds the
engines, so the job does not start its own. With `--policy cascade` (and `--generate`), each prompt is instead
answered by cascade routing: models asked in turn on that endpoint, each answer judged, the best kept (`answer`,
`answered_by`, `cascade_models`, `cascade_posthoc_quality`, `cascade_estimated_cost_usd`, `estimated_cost_usd`,
`task`, `task_probability`, `error`), with the step the Ranker deployment takes for a served request.
Paths may be local or any URI pyarrow reads (s3://, gs://). After a crash, the same command with `--resume`
writes only the rows that are missing.

Modules: `ranking`, `answers` and `cascade` (the Ray Data stages), `output`
(part files and resume), `cli` (the pipeline and the command line). Its input reader (checks and row ranges) is
`serve.core.prompt_files`, shared with the streamed fit.
"""
