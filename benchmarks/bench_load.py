"""The router under load: many concurrent clients on loopback, against `/v1/route` and against `/v1/chat/completions`.

Runs the app as a user does (`serve run` on a copy of `serve.config`, so its deployment settings, queue bounds
included, apply), with every pool model sent to a fast fake OpenAI upstream in a process of its own, so the chat
figures measure the router (the ingress and its decisions, the Embedder, the OpenAIEndpoint hop), not a model. For each route,
`--clients` clients send requests back to back for `--duration` seconds; the script prints requests, throughput,
p50 and p99 of the answered requests, and the count of each status. The only failures allowed are deliberate
backpressure answers (503 with Retry-After, which the client honours before its next request); any other
answer makes it exit with 1.

The prompts are test-split prompts of llmrouter_9model. Once the app is down, the same prompts are encoded in this
process, batched, on every core: what the machine can encode without Serve, the baseline of `/v1/route`'s
throughput (goal: at least GOAL of it).

    python benchmarks/bench_load.py [--clients 64] [--duration 60] [--artifact artifacts/llmrouter_9model]

The clients run in this process, on the same cores as the app.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import aiohttp
import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.8  # /v1/route answers per second, as a share of the bare batched encode's prompts per second


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_fake_upstream(port: int) -> None:
    """An OpenAI-compatible server that answers every chat request at once with the same short completion."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        body = await request.json()
        return JSONResponse({"id": "fake", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}})

    uvicorn.run(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]), host="127.0.0.1", port=port,
                log_level="warning", backlog=2048)


def write_serve_config(folder: Path, artifact: Path, upstream: str, port: int) -> Path:
    """serve.config with every pool model on the fake upstream and the app on `port`."""
    from serve.core.artifact import RouterArtifact

    config = yaml.safe_load((REPO / "serve.config").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["artifact"] = str(artifact)
    app["args"]["backends"] = {model: {"kind": "openai", "base_url": upstream, "timeout_s": 30}
                               for model in RouterArtifact.load(artifact).models}
    path = folder / "serve.config"
    path.write_text(yaml.safe_dump(config))
    return path


async def wait_until_up(base: str, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{base}/v1/models") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1)
    raise SystemExit(f"the app did not answer {base}/v1/models within {limit_s:g} s")


async def load(url: str, bodies: list[dict], clients: int, duration_s: float) -> dict:
    """`clients` clients posting back to back for `duration_s`: latencies of the 200s, and every status seen."""
    latencies, statuses, unexpected = [], collections.Counter(), collections.Counter()
    stop_at = time.monotonic() + duration_s

    async def client(session: aiohttp.ClientSession, offset: int):
        sent = offset
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                async with session.post(url, json=bodies[sent % len(bodies)]) as response:
                    await response.read()
                    status, retry_after = response.status, response.headers.get("Retry-After")
            except aiohttp.ClientError as error:
                status, retry_after = type(error).__name__, None
            sent += 1
            statuses[status] += 1
            if status == 200:
                latencies.append((time.perf_counter() - started) * 1e3)
            elif status == 503 and retry_after:  # a deliberate backpressure answer: wait as it asks, as clients should
                await asyncio.sleep(float(retry_after))
            else:
                unexpected[status] += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session, offset) for offset in range(clients)))
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "statuses": statuses, "unexpected": unexpected, "elapsed": elapsed}


def bare_batched_encode(texts: list[str], embedder: str, min_seconds: float = 20.0) -> float:
    """Prompts/s of the Embedder's encode step (the same window of each prompt, the same forward batches) in this
    process on every core, passes over `texts` repeated for at least `min_seconds`."""
    import torch

    from serve.core.encoder import encode, load_encoder
    from serve.core.features import WINDOW_CHARS

    torch.set_num_threads(os.cpu_count())
    encoder = load_encoder(embedder, device="cpu")
    windows = [text[:WINDOW_CHARS] for text in texts]
    encode(encoder, windows[:16])  # warm-up
    encoded, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        encode(encoder, windows)
        encoded += len(windows)
    return encoded / (time.perf_counter() - started)


def test_prompts(count: int) -> list[str]:
    from training.datasets import load_dataset

    table = load_dataset("llmrouter_9model")
    return [table.prompts[row] for row in np.flatnonzero(table.splits == "test")[:count]]


def report(name: str, result: dict) -> str:
    answered = result["latencies"]
    p50, p99 = (np.percentile(answered, [50, 99]) if answered else (float("nan"),) * 2)
    total = sum(result["statuses"].values())
    statuses = ", ".join(f"{status}: {count}" for status, count in sorted(result["statuses"].items(), key=str))
    return (f"| {name} | {total} | {len(answered) / result['elapsed']:.1f} | {p50:.0f} | {p99:.0f} | {statuses} | "
            f"{sum(result['unexpected'].values())} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60, help="seconds per route")
    parser.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "llmrouter_9model")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for the app to come up")
    parser.add_argument("--prompts", type=int, default=200, help="test-split prompts to cycle through")
    args = parser.parse_args()

    from serve.core.artifact import RouterArtifact

    prompts = test_prompts(args.prompts)

    upstream_port, app_port = _free_port(), _free_port()
    upstream = multiprocessing.get_context("spawn").Process(target=run_fake_upstream, args=(upstream_port,), daemon=True)
    upstream.start()
    base = f"http://127.0.0.1:{app_port}"
    with tempfile.TemporaryDirectory() as folder:
        config = write_serve_config(Path(folder), args.artifact.resolve(), f"http://127.0.0.1:{upstream_port}/v1", app_port)
        # A Ray of its own (RAY_ADDRESS=local), so the run never lands on another cluster of the machine.
        server = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(config)], cwd=REPO,
                                  env={**os.environ, "RAY_ADDRESS": "local"}, stdout=subprocess.DEVNULL,
                                  stderr=open(Path(folder) / "serve.log", "w"))
        try:
            asyncio.run(wait_until_up(base, args.start_timeout))
            route_bodies = [{"prompt": prompt} for prompt in prompts]
            chat_bodies = [{"model": "router", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16} for prompt in prompts]
            asyncio.run(load(f"{base}/v1/route", route_bodies, 8, 5))  # warm-up: connections, batching, caches
            results = {"/v1/route": asyncio.run(load(f"{base}/v1/route", route_bodies, args.clients, args.duration)),
                       "/v1/chat/completions": asyncio.run(load(f"{base}/v1/chat/completions", chat_bodies, args.clients, args.duration))}
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
            upstream.terminate()
    bare = bare_batched_encode(prompts, RouterArtifact.load(args.artifact).embedder)
    print(f"\n{os.cpu_count()} CPUs, {args.clients} clients for {args.duration:g} s per route, loopback, {len(prompts)} "
          f"test-split prompts of llmrouter_9model; latency of the answered (200) requests\n")
    print("| route | requests | answered/s | p50 ms | p99 ms | statuses | other errors |\n|---|---|---|---|---|---|---|")
    for name, result in results.items():
        print(report(name, result))
    share = len(results["/v1/route"]["latencies"]) / results["/v1/route"]["elapsed"] / bare
    print(f"\nbare batched encode, {os.cpu_count()} threads: {bare:.1f} prompts/s; /v1/route answered {share:.2f}x of it "
          f"(goal >= {GOAL}x: {'met' if share >= GOAL else 'missed'})")
    return 1 if any(result["unexpected"] for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
