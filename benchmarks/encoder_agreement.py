"""How far an encoder backend moves the embeddings, and the routing decisions made from them.

For each dataset, every prompt is embedded by the PyTorch encoder and by each ONNX backend (`name@onnx`,
`name@onnx-int8`; `serve.core.onnx_encoder`), through `training.embed.embed_texts`, so each backend's vectors are
computed once and cached like any embedder's; the report gives the cosine of each prompt's two embeddings
(mean, 1st percentile, minimum, share >= the bar). With `--artifact`, it also routes that artifact's dataset's
test prompts at each preset from both embeddings and gives the share whose routed model is the same: what
serving an artifact trained on PyTorch embeddings with the ONNX encoder would change.

A run embeds what is not cached yet, so a long first pass splits into short runs by `--datasets` and
`--backends`; a run over everything cached then only reads and writes the report.

    python benchmarks/encoder_agreement.py --datasets llmrouter_9model --backends onnx-int8 --out /tmp/agreement
    python benchmarks/encoder_agreement.py --artifact artifacts/llmrouter_9model --out docs/results/encoder_onnx/agreement
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from serve.core.artifact import RouterArtifact
from serve.core.decision import PRESETS
from serve.core.encoder import DEFAULT_EMBEDDER, count_tokens
from serve.core.onnx_encoder import ONNX_FILES
from training.datasets import BUILTIN_DATASETS, load_dataset
from training.embed import embed_texts

BAR = 0.99  # issue 17: the ONNX embeddings must agree with PyTorch's to this cosine


def cosine_figures(reference: np.ndarray, other: np.ndarray) -> dict:
    """Per-prompt cosines of two sets of unit rows, summarised."""
    cosines = np.einsum("ij,ij->i", reference.astype(np.float64), other.astype(np.float64))
    return {"prompts": len(cosines), "mean": float(cosines.mean()), "p1": float(np.percentile(cosines, 1)),
            "min": float(cosines.min()), "share_at_bar": float((cosines >= BAR).mean())}


def same_decisions(artifact: RouterArtifact, texts: list[str], reference: np.ndarray, other: np.ndarray) -> dict:
    """Per preset, the share of prompts whose routed model is the same from either embedding."""
    tokens = count_tokens(texts, artifact.embedder)
    shares = {}
    for preset, cost_weight in PRESETS.items():
        routed = [artifact.route(embeddings, texts, tokens, cost_weight).order[:, 0] for embeddings in (reference, other)]
        shares[preset] = float(np.mean(routed[0] == routed[1]))
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="the PyTorch encoder the backends are compared to")
    parser.add_argument("--datasets", nargs="+", default=list(BUILTIN_DATASETS))
    parser.add_argument("--backends", nargs="+", default=list(ONNX_FILES), choices=list(ONNX_FILES))
    parser.add_argument("--artifact", type=Path, help="also compare its routing decisions on its dataset's test prompts")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json and report.md")
    args = parser.parse_args()

    artifact = RouterArtifact.load(args.artifact) if args.artifact else None
    result = {"embedder": args.embedder, "bar": BAR, "agreement": {}, "decisions": {}}
    for dataset in args.datasets:
        table = load_dataset(dataset)
        reference = embed_texts(table.prompts, args.embedder, use_ray=False)
        result["agreement"][dataset] = {}
        for backend in args.backends:
            embeddings = embed_texts(table.prompts, f"{args.embedder}@{backend}", use_ray=False)
            result["agreement"][dataset][backend] = cosine_figures(reference, embeddings)
            print(dataset, backend, result["agreement"][dataset][backend], flush=True)
            if artifact is not None and dataset == artifact.manifest["dataset"]:
                test = np.flatnonzero(table.splits == "test")
                texts = [table.prompts[row] for row in test]
                result["decisions"][backend] = {
                    "artifact": str(args.artifact), "test_prompts": len(test),
                    "same_routed_model": same_decisions(artifact, texts, reference[test], embeddings[test])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(result, indent=1))
    (args.out / "report.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [f"Cosine of each prompt's embedding by `{result['embedder']}` on PyTorch (float32) and on ONNX Runtime; "
             f"the bar is {result['bar']}.", "",
             "| dataset | backend | prompts | mean | 1st percentile | min | share >= bar |", "|---|---|---|---|---|---|---|"]
    for dataset, backends in result["agreement"].items():
        for backend, f in backends.items():
            lines.append(f"| {dataset} | {backend} | {f['prompts']} | {f['mean']:.4f} | {f['p1']:.4f} | {f['min']:.4f} "
                         f"| {f['share_at_bar']:.3f} |")
    if result["decisions"]:
        presets = list(PRESETS)
        lines += ["", "Share of test prompts routed to the same model from either embedding (same artifact, same preset):", "",
                  "| backend | artifact | test prompts | " + " | ".join(presets) + " |", "|---|---|---|" + "---|" * len(presets)]
        for backend, d in result["decisions"].items():
            lines.append(f"| {backend} | {d['artifact']} | {d['test_prompts']} | "
                         + " | ".join(f"{d['same_routed_model'][p]:.3f}" for p in presets) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
