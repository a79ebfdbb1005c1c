"""What this product's GPU path does on a lent GPU machine, in a few minutes: run by benchmarks/gpu_check.sh.

That machine reaches no package registry and has CUDA torch, transformers and sentence-transformers, but no
Ray, vLLM or faiss, and a call carries at most 64 MiB of files. So `prepare` (run here, where the project is
installed) writes what the steps need into an ignored folder that the call carries: the bundled MiniLM
encoder in fp16, a sample of real prompts with their CPU embeddings (the reference the GPU must match) and
the trained router artifact. `run` (there) measures, each step failing loudly:

- encode: prompts/s of the sentence-transformers encoder on the GPU at large batches in fp16, and that its
  embeddings match the CPU ones;
- knn: the exact kNN graph of 1e6 prompt-like vectors with `training.exact_knn.torch_knn` (the product's GPU path
  where faiss has no GPU build), with recall@10 against an exact CPU search of sampled rows;
- decide: the router's decision (networks and ranking, prompt features aside) on 1e6 prompts, as the Ranker
  and the batch job compute it (`RouterArtifact.predict_inputs` and `serve.core.decision.rank_models`).

    .venv/bin/python benchmarks/gpu_check.py prepare --assets .gpu_check       # here
    python3 benchmarks/gpu_check.py run --assets .gpu_check [--device cuda]    # there
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script on a machine where the project is not installed

STEPS = ("encode", "knn", "decide")
ENCODER_DIR, PROMPTS_FILE, REFERENCE_FILE, ARTIFACT_DIR = "encoder", "prompts.json", "reference.npy", "artifact"
REFERENCE_PROMPTS = 256  # prompts whose CPU embeddings the GPU's must match
MIN_COSINE_TO_CPU = 0.999  # fp16 on the GPU against fp32 on the CPU
MIN_RECALL_AT_10 = 0.99  # an exact search in fp16 may swap near-ties, nothing else
RECALL_QUERIES = 1000


class CheckFailed(RuntimeError):
    """A step produced a wrong result (not merely a slow one)."""


def prepare(assets: Path, artifact: Path, dataset: str, prompts: int) -> None:
    """Write the encoder (fp16), real prompts, their CPU embeddings and the artifact into `assets`."""
    import torch

    from serve.core.encoder import DEFAULT_EMBEDDER, encode, load_encoder
    from training.datasets import load_dataset

    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    encoder = load_encoder(DEFAULT_EMBEDDER, device="cpu")
    texts = load_dataset(dataset).prompts[:prompts]
    (assets / PROMPTS_FILE).write_text(json.dumps(texts))
    np.save(assets / REFERENCE_FILE, encode(encoder, texts[:REFERENCE_PROMPTS]))
    encoder.to(torch.float16).save(str(assets / ENCODER_DIR))
    shutil.copytree(artifact, assets / ARTIFACT_DIR)
    size = sum(f.stat().st_size for f in assets.rglob("*") if f.is_file())
    print(f"prepared {assets}: {len(texts)} prompts, encoder, artifact; {size / 2**20:.1f} MiB to carry")


def _timed(step: str, function, *args):
    started = time.perf_counter()
    result = function(*args)
    print(f"[{step}] done in {time.perf_counter() - started:.1f} s", flush=True)
    return result


def check_encode(assets: Path, device: str, batch_size: int) -> np.ndarray:
    """Prompts/s at large batches; the first REFERENCE_PROMPTS must match their CPU embeddings."""
    import torch
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(assets / ENCODER_DIR), device=device)
    if device == "cpu":
        encoder = encoder.to(torch.float32)  # CPUs have no fast fp16 matrix products
    texts = json.loads((assets / PROMPTS_FILE).read_text())
    encoder.encode(texts[:batch_size], batch_size=batch_size)  # warm-up: kernels, allocator
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    embeddings = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(f"[encode] {len(texts)} prompts at batch {batch_size} on {device}: {len(texts) / seconds:,.0f} prompts/s", flush=True)
    reference = np.load(assets / REFERENCE_FILE)
    cosine = (embeddings[: len(reference)].astype(np.float32) * reference).sum(axis=1)
    print(f"[encode] cosine to the CPU embeddings: min {cosine.min():.5f}, mean {cosine.mean():.5f}")
    if cosine.min() < MIN_COSINE_TO_CPU:
        raise CheckFailed(f"encode: a GPU embedding differs from its CPU reference (cosine {cosine.min():.4f} < {MIN_COSINE_TO_CPU})")
    return embeddings.astype(np.float32)


def prompt_like_vectors(prompts: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """`rows` unit vectors around the real prompt embeddings (each a prompt plus isotropic noise), so that the
    kNN search meets the neighbourhood structure of real prompts at a million rows."""
    rng = np.random.default_rng(seed)
    base = prompts[rng.integers(0, len(prompts), rows)]
    vectors = base + rng.standard_normal(base.shape, dtype=np.float32) * (0.6 / np.sqrt(base.shape[1]))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def check_knn(embeddings: np.ndarray, rows: int, device: str, dtype: str) -> None:
    from training.exact_knn import torch_knn

    vectors = prompt_like_vectors(embeddings, rows)
    started = time.perf_counter()
    neighbours, similarities = torch_knn(vectors, 10, device=device, dtype=dtype)
    seconds = time.perf_counter() - started
    print(f"[knn] exact 10-NN graph of {rows:,} x {vectors.shape[1]} on {device} ({dtype}): {seconds:.1f} s, "
          f"{rows / seconds:,.0f} rows/s", flush=True)
    queries = np.random.default_rng(1).choice(rows, min(RECALL_QUERIES, rows), replace=False)
    exact = vectors[queries] @ vectors.T
    exact[np.arange(len(queries)), queries] = -np.inf
    truth = np.argpartition(-exact, 10, axis=1)[:, :10]
    recall = np.mean([len(set(found) & set(true)) / 10 for found, true in zip(neighbours[queries], truth)])
    print(f"[knn] recall@10 against an exact CPU search of {len(queries)} rows: {recall:.4f}")
    if recall < MIN_RECALL_AT_10 or not np.isfinite(similarities).all():
        raise CheckFailed(f"knn: recall@10 {recall:.4f} < {MIN_RECALL_AT_10} (or non-finite similarities)")


def check_decide(assets: Path, embeddings: np.ndarray, rows: int, chunk: int = 65536) -> None:
    from serve.core.artifact import RouterArtifact
    from serve.core.decision import PRESETS, rank_models

    artifact = RouterArtifact.load(assets / ARTIFACT_DIR)
    vectors = prompt_like_vectors(embeddings, rows, seed=2)
    features = np.zeros((rows, len(artifact.weights["feature_mean"])), np.float32)  # standardised: the mean prompt
    tokens = np.full(rows, 64)
    started = time.perf_counter()
    chosen = np.empty(rows, dtype=np.int64)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        quality, _ = artifact.predict_inputs(np.concatenate([vectors[start:stop], features[start:stop]], axis=1))
        order, _ = rank_models(quality, artifact.cost_model.estimate(tokens[start:stop]), PRESETS["balanced"], artifact.cost_scale)
        chosen[start:stop] = order[:, 0]
    seconds = time.perf_counter() - started
    share = np.bincount(chosen, minlength=len(artifact.models)) / rows
    print(f"[decide] {rows:,} decisions (NumPy, this machine's CPU): {seconds:.1f} s, {rows / seconds:,.0f} prompts/s; "
          f"most chosen: {artifact.models[share.argmax()]} ({share.max():.0%})", flush=True)
    if not np.isfinite(quality).all():
        raise CheckFailed("decide: non-finite predicted quality")


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> None:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch_cuda_available() else "cpu")
    if args.require_gpu and device != "cuda":
        raise CheckFailed("no CUDA device: this check measures a GPU (pass --no-require-gpu to run its steps on the CPU)")
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    embeddings = _timed("encode", check_encode, args.assets, device, args.batch_size)
    if "knn" in args.steps:
        _timed("knn", check_knn, embeddings, args.rows, device, "float16" if device == "cuda" else "float32")
    if "decide" in args.steps:
        _timed("decide", check_decide, args.assets, embeddings, args.rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="here: write what the check needs into --assets")
    prep.add_argument("--assets", type=Path, default=REPO / ".gpu_check")
    prep.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "llmrouter_9model")
    prep.add_argument("--dataset", default="llmrouter_9model")
    prep.add_argument("--prompts", type=int, default=6000)
    check = commands.add_parser("run", help="there: the checks, in order; the first failure exits non-zero")
    check.add_argument("--assets", type=Path, default=REPO / ".gpu_check")
    check.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="encode always runs: the others use its embeddings")
    check.add_argument("--rows", type=int, default=1_000_000, help="prompts in the kNN graph and in the decision step")
    check.add_argument("--batch-size", type=int, default=512)
    check.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    check.add_argument("--require-gpu", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if args.command == "run" and not (args.assets / ARTIFACT_DIR).is_dir():
        parser.error(f"{args.assets}: not prepared; run `benchmarks/gpu_check.sh --prepare` here first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.assets, args.artifact, args.dataset, args.prompts)
        else:
            run(args)
    except CheckFailed as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    print("all checks passed" if args.command == "run" else "ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
