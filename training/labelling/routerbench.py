"""The reference judges checked against RouterBench's own correctness labels, and a router fitted on judge labels
against one fitted on the dataset's labels.

    python -m training.labelling.routerbench agreement --out docs/results/judge_agreement
    python -m training.labelling.routerbench cv --labels docs/results/judge_agreement/judge_scores.npz \
        --out docs/results/routerbench_cv_judged

RouterBench's raw files hold every model's full answer and its 0/1 label, but no gold answer, so the references
are rebuilt without the label under test:
- ARC-Challenge and Winogrande (multiple choice): the reference for model m's answer is the letter most of the
  *other* models that RouterBench marked correct chose (m's own label never builds its reference); a prompt where
  no other model was marked correct has no reference for m.
- MBPP: RouterBench's prompts are MBPP's (sanitized) problem texts without tests. The tests come from the two
  MBPP copies in the data directory (LLMRouter's query data: three asserts per task; RouterDC's MBPP file: one),
  matched to each prompt by the nearest problem text (cosine of the router's embeddings at or above
  MBPP_MATCH_COSINE); an unmatched prompt has no reference.
Agreement is the fraction of (prompt, model) pairs with a reference where the judge's 0/1 equals RouterBench's.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from serve.core.answer_facts import choice_letter
from serve.core.paths import data_dir
from training.datasets import load_dataset
from training.labelling.judges import judge_choice, judge_code

AGREEMENT_GOAL = 0.95
MBPP_MATCH_COSINE = 0.9
MULTIPLE_CHOICE = ("arc-challenge", "winogrande")


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def consensus_references(responses: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N, M] object: for each model, the letter most of the other models marked correct chose (None where none
    of them was, or none of them names a letter)."""
    letters = np.vectorize(choice_letter, otypes=[object])(responses)
    references = np.full(responses.shape, None, dtype=object)
    for row in range(responses.shape[0]):
        for model in range(responses.shape[1]):
            votes = Counter(letters[row, other] for other in range(responses.shape[1])
                            if other != model and labels[row, other] == 1 and letters[row, other] is not None)
            if votes:
                references[row, model] = votes.most_common(1)[0][0]
    return references


_ASSERT = re.compile(r"^\s*assert\b.*$", re.MULTILINE)


def mbpp_problems(root: Path) -> tuple[list[str], list[str]]:
    """(problem texts, their tests as `assert` lines) from LLMRouter's MBPP rows (three tests each) and RouterDC's
    MBPP file (one test each, inside the question), LLMRouter's first where both hold a problem."""
    texts, tests = [], []
    for split in ("train", "test"):
        with gzip.open(root / "llmrouter_9model" / "raw" / f"default_query_{split}.jsonl.gz", "rt") as handle:
            for line in handle:
                row = json.loads(line)
                if row["task_name"] == "mbpp":
                    texts.append(row["query"].strip())
                    tests.append("\n".join(ast.literal_eval(row["ground_truth"])))
    seen = set(texts)
    with gzip.open(root / "routerdc_7model" / "raw" / "mbpp.json.gz", "rt") as handle:
        for row in json.load(handle):
            question = row["question"].strip().strip('"').strip()
            text = _ASSERT.sub("", question).strip()
            if text not in seen:
                texts.append(text)
                tests.append("\n".join(match.strip() for match in _ASSERT.findall(question)))
    return texts, tests


def mbpp_references(prompts: list[str], root: Path) -> tuple[list[str | None], np.ndarray]:
    """Each prompt's matched tests (None below MBPP_MATCH_COSINE) and the match's cosine."""
    from serve.core.encoder import encode, load_encoder

    texts, tests = mbpp_problems(root)
    encoder = load_encoder("all-MiniLM-L6-v2", device="cpu")
    similarity = encode(encoder, prompts) @ encode(encoder, texts).T
    best = similarity.argmax(axis=1)
    cosine = similarity[np.arange(len(prompts)), best]
    return [tests[b] if c >= MBPP_MATCH_COSINE else None for b, c in zip(best, cosine)], cosine


def judge_scores(table, root: Path, workers: int = 2) -> tuple[np.ndarray, dict]:
    """[N, M] the reference judges' 0/1 on the table's recorded answers (NaN where no reference applies) and,
    per benchmark, how the references were found."""
    scores = np.full(table.scores.shape, np.nan)
    notes = {}
    for benchmark in MULTIPLE_CHOICE:
        rows = np.flatnonzero(table.benchmarks == benchmark)
        references = consensus_references(table.responses[rows], table.scores[rows])
        for i, row in enumerate(rows):
            for model in range(len(table.models)):
                if references[i, model] is not None:
                    scores[row, model] = judge_choice(table.responses[row, model], references[i, model]).score
        notes[benchmark] = "reference: the letter most other models marked correct chose"
    rows = np.flatnonzero(table.benchmarks == "mbpp")
    tests, cosine = mbpp_references([table.prompts[row] for row in rows], root)
    jobs = [(row, model, test) for row, test in zip(rows, tests) if test for model in range(len(table.models))]
    with ThreadPoolExecutor(workers) as threads:
        verdicts = list(threads.map(lambda job: judge_code(table.responses[job[0], job[1]], job[2]).score, jobs))
    for (row, model, _), score in zip(jobs, verdicts):
        scores[row, model] = score
    notes["mbpp"] = (f"reference: MBPP's tests of the nearest problem text (cosine >= {MBPP_MATCH_COSINE}); "
                     f"{sum(t is not None for t in tests)} of {len(rows)} prompts matched (median cosine {np.median(cosine):.3f})")
    return scores, notes


def agreement_report(table, scores: np.ndarray, notes: dict, command: str, seconds: float) -> dict:
    per_benchmark = {}
    for benchmark in sorted(set(table.benchmarks)):
        rows = table.benchmarks == benchmark
        judged = ~np.isnan(scores[rows])
        agree = scores[rows][judged] == table.scores[rows][judged]
        per_model = {model: {"pairs": int(judged[:, m].sum()),
                             "agreement": float((scores[rows][:, m] == table.scores[rows][:, m])[judged[:, m]].mean())
                             if judged[:, m].any() else None}
                     for m, model in enumerate(table.models)}
        judge_mean, label_mean = scores[rows][judged].mean(), table.scores[rows][judged].mean()
        per_benchmark[benchmark] = {
            "prompts": int(rows.sum()), "pairs": int(rows.sum() * len(table.models)), "judged_pairs": int(judged.sum()),
            "agreement": float(agree.mean()), "goal_met": bool(agree.mean() >= AGREEMENT_GOAL),
            "judge_mean_score": float(judge_mean), "label_mean_score": float(label_mean),
            "judge_1_label_0": int(((scores[rows] == 1) & (table.scores[rows] == 0)).sum()),
            "judge_0_label_1": int(((scores[rows] == 0) & (table.scores[rows] == 1)).sum()),
            "reference": notes[benchmark], "per_model": per_model}
    return {"dataset": table.name, "goal": AGREEMENT_GOAL, "command": command, "commit": _commit(), "seconds": seconds,
            "benchmarks": per_benchmark}


def agreement_markdown(report: dict) -> str:
    lines = [f"Judge agreement with RouterBench's correctness labels (`{report['dataset']}`, goal >= {report['goal']:.0%} per "
             f"benchmark). Command: `{report['command']}`, commit `{report['commit']}`.", "",
             "| benchmark | prompts | (prompt, model) pairs judged | agreement | goal met | judge 1 / label 0 | judge 0 / label 1 "
             "| mean score judge / labels | reference |", "|---|---|---|---|---|---|---|---|---|"]
    for name, b in report["benchmarks"].items():
        lines.append(f"| {name} | {b['prompts']} | {b['judged_pairs']} of {b['pairs']} | {b['agreement']:.3f} | "
                     f"{'yes' if b['goal_met'] else 'no'} | {b['judge_1_label_0']} | {b['judge_0_label_1']} | "
                     f"{b['judge_mean_score']:.3f} / {b['label_mean_score']:.3f} | {b['reference']} |")
    lines += ["", "Per model (agreement on the pairs judged):", "",
              "| model | " + " | ".join(report["benchmarks"]) + " |", "|---|" + "---|" * len(report["benchmarks"])]
    models = next(iter(report["benchmarks"].values()))["per_model"]
    for model in models:
        cells = [report["benchmarks"][b]["per_model"][model]["agreement"] for b in report["benchmarks"]]
        lines.append(f"| {model} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_agreement(args) -> None:
    started = time.perf_counter()
    table = load_dataset("routerbench_partial")
    scores, notes = judge_scores(table, data_dir(), args.workers)
    report = agreement_report(table, scores, notes, " ".join(["python -m training.labelling.routerbench", *sys.argv[1:]]),
                              time.perf_counter() - started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(agreement_markdown(report))
    np.savez_compressed(out / "judge_scores.npz", scores=scores, prompt_ids=table.prompt_ids.astype(str), models=np.array(table.models))
    print(agreement_markdown(report))


def run_cv(args) -> None:
    """Paired cv: the same folds and seeds, routers trained on the judge's labels or on the dataset's, every test
    fold scored by the dataset's labels, on the prompts the judge graded for every model."""

    from training.embed import embed_texts
    from training.evaluate import evaluate, markdown_table, write_report

    started = time.perf_counter()
    table = load_dataset("routerbench_partial")
    saved = np.load(args.labels)
    if saved["prompt_ids"].tolist() != table.prompt_ids.astype(str).tolist() or saved["models"].tolist() != table.models:
        raise ValueError(f"{args.labels}: judged another version of the table; rerun `agreement`")
    judged = ~np.isnan(saved["scores"]).any(axis=1)
    table, judge = table.subset(judged), saved["scores"][judged]
    embeddings = embed_texts(table.prompts)
    seeds = tuple(range(args.seeds))
    reports = {source: evaluate(table, embeddings, "cv", routers=args.routers, seeds=seeds, bootstrap_samples=0, progress=False,
                                training_scores=judge if source == "judge" else None)
               for source in ("dataset", "judge")}
    command = " ".join(["python -m training.labelling.routerbench", *sys.argv[1:]])
    out = Path(args.out)
    comparison = {}
    for name, entry in reports["dataset"]["routers"].items():
        judged_entry = reports["judge"]["routers"][name]
        folds = list(entry["per_fold"])
        differences = np.array([judged_entry["per_fold"][f]["aiq"] - entry["per_fold"][f]["aiq"] for f in folds])
        comparison[name] = {"aiq_dataset_labels": entry["aiq"], "aiq_judge_labels": judged_entry["aiq"],
                            "per_fold_difference": dict(zip(folds, differences.tolist())),
                            "difference_mean": float(differences.mean()), "difference_std": float(differences.std(ddof=1))}
    for source, report in reports.items():
        report.update(command=command, commit=_commit(), trained_on=f"{source} labels", rows=int(judged.sum()))
        write_report(report, out / f"trained_on_{source}_labels")
    summary = {"dataset": "routerbench_partial", "protocol": "cv", "seeds": list(seeds), "rows": int(judged.sum()),
               "rows_dropped": int((~judged).sum()), "command": command, "commit": _commit(),
               "seconds": time.perf_counter() - started, "label_disagreement": float((judge != table.scores).mean()),
               "routers": comparison}
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    lines = [f"routerbench_partial, 5-fold cv, seeds {list(seeds)}, {summary['rows']} prompts every model of which the judge graded "
             f"({summary['rows_dropped']} without a reference dropped from both runs); test folds scored by the dataset's labels in "
             f"both. Judge and dataset labels differ on {summary['label_disagreement']:.1%} of the training pairs. "
             f"Command: `{command}`, commit `{summary['commit']}`.", "",
             "| router | AIQ trained on dataset labels | AIQ trained on judge labels | judge - dataset (mean ± std over the 5 paired folds) |",
             "|---|---|---|---|"]
    for name, c in comparison.items():
        lines.append(f"| {name} | {c['aiq_dataset_labels']:.3f} | {c['aiq_judge_labels']:.3f} | "
                     f"{c['difference_mean']:+.4f} ± {c['difference_std']:.4f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n\nFull tables: `trained_on_dataset_labels/report.md`, "
                                   "`trained_on_judge_labels/report.md`.\n")
    print((out / "report.md").read_text())
    print(markdown_table(reports["judge"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.labelling.routerbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    agreement = commands.add_parser("agreement", help="judge RouterBench's recorded answers; agreement with its labels")
    agreement.add_argument("--out", required=True)
    agreement.add_argument("--workers", type=int, default=2, help="code tests run at once")
    cv = commands.add_parser("cv", help="cv AIQ of routers trained on judge labels vs on the dataset's labels, paired")
    cv.add_argument("--labels", required=True, help="judge_scores.npz written by `agreement`")
    cv.add_argument("--out", required=True)
    cv.add_argument("--seeds", type=int, default=3)
    cv.add_argument("--routers", nargs="+", default=["zero_router", "oracle", "prior", "knn", "mlp", "finerouter"])
    args = parser.parse_args(argv)
    (run_agreement if args.command == "agreement" else run_cv)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
