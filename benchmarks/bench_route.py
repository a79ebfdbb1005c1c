"""Latency and throughput of `/v1/route`, against what a decision cannot avoid: encoding the prompt and one Serve hop.

Deploys the app of `serve.config` (its args, with Serve's code defaults for the deployments) and a no-op FastAPI
deployment beside it, then, on 127.0.0.1 only:
- at concurrency 1, for each prompt in turn: `/v1/route`, the no-op hop (the same HTTP request to a deployment that
  does nothing) and a bare sentence-transformers encode in this process, with as many torch threads as the
  Embedder replica gets (Ray gives a fractional-CPU actor one). Interleaved, so that whatever else the shared
  machine does weighs on the three alike;
- `/v1/route` at each higher concurrency: p50, p99 and throughput over a bounded number of requests;
- the decision's own time in the ingress (the `decision_ms` each response reports).
The goal is p50 at concurrency 1 within 1.3x of (bare encode + no-op hop).

    python benchmarks/bench_route.py --requests 200 --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure this checkout's code (Ray's workers take the driver's path), not an installed one
GOAL = 1.3


def _percentiles(milliseconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(milliseconds, 50)), float(np.percentile(milliseconds, 99))


async def _load(url: str, bodies: list[dict], concurrency: int, requests: int) -> tuple[list[float], float, list[dict]]:
    """Send `requests` POSTs from `concurrency` workers; (latencies ms, requests/s, response bodies)."""
    latencies, answers, next_index = [], [], iter(range(requests))

    async def worker(client: httpx.AsyncClient):
        for index in next_index:
            started = time.perf_counter()
            response = await client.post(url, json=bodies[index % len(bodies)])
            latencies.append((time.perf_counter() - started) * 1e3)
            response.raise_for_status()
            answers.append(response.json())

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, requests / elapsed, answers


def _deploy(port: int) -> str:
    import cloudpickle
    import noop_app
    import ray
    from ray import serve

    from serve.app.builder import build_app

    cloudpickle.register_pickle_by_value(noop_app)  # Ray's workers cannot import this script's folder
    args = yaml.safe_load((REPO / "serve.config").read_text())["applications"][0]["args"]
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="finerouter", route_prefix="/")
    serve.run(noop_app.app, name="noop", route_prefix="/noop")
    return f"http://127.0.0.1:{port}"


def _one_at_a_time(base: str, bodies: list[dict], texts: list[str], embedder: str, threads: int,
                   requests: int) -> tuple[list[float], list[float], list[float], list[dict]]:
    """Milliseconds of /v1/route, the no-op hop and the bare encode, each prompt in turn; and the route answers."""
    import torch

    from serve.core.encoder import encode, load_encoder

    torch.set_num_threads(threads)
    encoder = load_encoder(embedder, device="cpu")
    encode(encoder, texts[:5], batch_size=1)  # warm-up
    route, hop, bare, answers = [], [], [], []
    with httpx.Client(timeout=120) as client:
        for index in range(requests):
            started = time.perf_counter()
            response = client.post(f"{base}/v1/route", json=bodies[index % len(bodies)])
            route.append((time.perf_counter() - started) * 1e3)
            response.raise_for_status()
            answers.append(response.json())
            started = time.perf_counter()
            client.post(f"{base}/noop/", json=bodies[index % len(bodies)]).raise_for_status()
            hop.append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            encode(encoder, [texts[index % len(texts)]], batch_size=1)
            bare.append((time.perf_counter() - started) * 1e3)
    return route, hop, bare, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="levels above 1 (1 always runs)")
    parser.add_argument("--prompts", type=int, default=200, help="test-split prompts to cycle through")
    parser.add_argument("--encode-threads", type=int, default=1, help="torch threads of the bare encode (the Embedder's)")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--out", type=Path, help="folder for report.json and report.md")
    args = parser.parse_args()

    from serve.core.artifact import RouterArtifact
    from training.datasets import load_dataset

    table = load_dataset("llmrouter_9model")
    texts = [table.prompts[row] for row in np.flatnonzero(table.splits == "test")[: args.prompts]]
    embedder = RouterArtifact.load(REPO / "artifacts" / "llmrouter_9model").embedder
    base = _deploy(args.port)
    route_bodies = [{"prompt": text} for text in texts]

    asyncio.run(_load(f"{base}/v1/route", route_bodies, 4, 40))  # warm-up: connections, batching, caches
    route_ms, hop, encode_ms, answers = _one_at_a_time(base, route_bodies, texts, embedder, args.encode_threads, args.requests)
    rows = [("/v1/route", 1, *_percentiles(route_ms), 1e3 / np.mean(route_ms))]
    decision_ms = [answer["decision_ms"] for answer in answers]
    for concurrency in [level for level in args.concurrency if level > 1]:
        latencies, throughput, answers = asyncio.run(_load(f"{base}/v1/route", route_bodies, concurrency, args.requests))
        decision_ms += [answer["decision_ms"] for answer in answers]
        rows.append(("/v1/route", concurrency, *_percentiles(latencies), throughput))
    rows.append(("no-op Serve hop", 1, *_percentiles(hop), 1e3 / np.mean(hop)))
    rows.append((f"bare encode ({args.encode_threads} thread)", 1, *_percentiles(encode_ms), 1e3 / np.mean(encode_ms)))
    rows.append(("decision in the ingress", "all", *_percentiles(decision_ms), None))

    floor = _percentiles(encode_ms)[0] + _percentiles(hop)[0]
    ratio = rows[0][2] / floor
    lines = [f"{os.cpu_count()} CPUs, {len(texts)} test-split prompts of llmrouter_9model, {args.requests} requests per level; "
             f"RAY_SERVE_THROUGHPUT_OPTIMIZED={os.environ.get('RAY_SERVE_THROUGHPUT_OPTIMIZED', 'unset')}", "",
             "| what | concurrency | p50 ms | p99 ms | req/s |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {concurrency} | {p50:.1f} | {p99:.1f} | {'-' if throughput is None else f'{throughput:.1f}'} |"
              for name, concurrency, p50, p99, throughput in rows]
    lines += ["", f"p50 at concurrency 1: {rows[0][2]:.1f} ms = {ratio:.2f}x (bare encode + no-op hop = {floor:.1f} ms); "
                  f"goal <= {GOAL}x: {'met' if ratio <= GOAL else 'missed'}"]
    print("\n" + "\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text("\n".join(lines) + "\n")
        report = {"argv": sys.argv[1:], "throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED"),
                  "rows": [dict(zip(("what", "concurrency", "p50_ms", "p99_ms", "requests_per_s"), row)) for row in rows],
                  "floor_ms": floor, "ratio": ratio, "goal": GOAL}
        (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
