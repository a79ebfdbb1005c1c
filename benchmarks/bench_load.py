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
    python benchmarks/bench_load.py --routes /v1/route --duration 30 --embedder 16:0.002:16 16:0.002:32 32:0.005:64

The clients run in this process, on the same cores as the app. While each route is loaded, the script also
measures where the cores went: the CPU seconds of the clients, Serve's proxy, each deployment's replicas, and every
other process (Ray's own, and anything else on the machine), as cores used on average.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import aiohttp
import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.8  # /v1/route answers per second, as a share of the bare batched encode's prompts per second
ROUTES = ("/v1/route", "/v1/chat/completions", "/noop/")
# Process groups whose CPU time is measured during each load, by a marker in their command line (Ray sets a
# replica's process title to its application and deployment).
CPU_GROUPS = {"proxy": "ray::ProxyActor", "ingress": "ServeReplica:finerouter:RouterIngress",
              "Embedder": "ServeReplica:finerouter:Embedder", "no-op": "ServeReplica:noop:NoOp"}


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


@dataclass(frozen=True)
class EmbedderSetting:
    """The Embedder's batching (`args.embedder`) and its replica's bounds (its `deployments:` entry)."""

    max_batch_size: int
    batch_wait_timeout_s: float
    max_ongoing_requests: int
    threads: int | None = None  # the encoder's torch threads; None: as Ray sets them

    @classmethod
    def parse(cls, text: str) -> EmbedderSetting:
        """SIZE:WAIT_S:ONGOING[:THREADS], e.g. 16:0.002:32."""
        fields = text.split(":")
        if len(fields) not in (3, 4):
            raise argparse.ArgumentTypeError(f"{text!r}: give SIZE:WAIT_S:ONGOING[:THREADS]")
        return cls(int(fields[0]), float(fields[1]), int(fields[2]), int(fields[3]) if len(fields) == 4 else None)

    def __str__(self) -> str:
        return (f"batch {self.max_batch_size}, wait {self.batch_wait_timeout_s * 1e3:g} ms, ongoing {self.max_ongoing_requests}"
                f"{f', {self.threads} threads' if self.threads else ''}")


def write_serve_config(folder: Path, artifact: Path, upstream: str, port: int, setting: EmbedderSetting | None) -> Path:
    """serve.config with every pool model on the fake upstream, the app on `port` and, when given, the Embedder's
    setting (its queue bound as large as its ongoing bound)."""
    from serve.core.artifact import RouterArtifact

    config = yaml.safe_load((REPO / "serve.config").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["artifact"] = str(artifact)
    app["args"]["backends"] = {model: {"kind": "openai", "base_url": upstream, "timeout_s": 30}
                               for model in RouterArtifact.load(artifact).models}
    if setting is not None:
        app["args"]["embedder"].update(max_batch_size=setting.max_batch_size, batch_wait_timeout_s=setting.batch_wait_timeout_s,
                                       threads=setting.threads)
        deployment = next(entry for entry in app["deployments"] if entry["name"] == "Embedder")
        deployment.update(max_ongoing_requests=setting.max_ongoing_requests, max_queued_requests=setting.max_ongoing_requests)
    # Serve's own floor beside it: a no-op app (benchmarks/noop_app.py) on /noop.
    config["applications"].append({"name": "noop", "route_prefix": "/noop", "import_path": "noop_app:app"})
    path = folder / "serve.config"
    path.write_text(yaml.safe_dump(config))
    return path


async def wait_until_up(base: str, limit_s: float) -> None:
    """Until the router (/v1/models) and the no-op app (/noop/) both answer."""
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{base}/v1/models") as models, session.post(f"{base}/noop/", json={}) as noop:
                    if models.status == noop.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1)
    raise SystemExit(f"the app did not answer {base}/v1/models and {base}/noop/ within {limit_s:g} s")


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


def cpu_seconds() -> tuple[collections.Counter, collections.Counter]:
    """CPU seconds so far of each process group (the clients are this process; "other" is every other process),
    and the number of processes in each group."""
    import psutil

    seconds, processes = collections.Counter(), collections.Counter()
    for process in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        times = process.info["cpu_times"]
        if times is None:
            continue
        command = " ".join(process.info["cmdline"] or [])
        group = "clients" if process.info["pid"] == os.getpid() else next(
            (name for name, marker in CPU_GROUPS.items() if marker in command), "other")
        seconds[group] += times.user + times.system
        processes[group] += 1
    return seconds, processes


def measured_load(url: str, bodies: list[dict], clients: int, duration_s: float) -> dict:
    """`load`, with the cores each process group used on average while it ran, and the replicas of each group."""
    import psutil

    before, _ = cpu_seconds()
    idle_before = psutil.cpu_times().idle
    result = asyncio.run(load(url, bodies, clients, duration_s))
    after, processes = cpu_seconds()
    elapsed = result["elapsed"]
    result["cores"] = {group: max(after[group] - before[group], 0.0) / elapsed for group in ("clients", *CPU_GROUPS, "other")}
    result["cores"]["idle"] = (psutil.cpu_times().idle - idle_before) / elapsed
    result["processes"] = {group: processes[group] for group in CPU_GROUPS}
    return result


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


def report(setting: str, route: str, result: dict, bare: float) -> dict:
    """One setting's figures on one route, and their table line."""
    answered = result["latencies"]
    p50, p99 = (float(value) for value in np.percentile(answered, [50, 99])) if answered else (None, None)
    total = sum(result["statuses"].values())
    statuses = ", ".join(f"{status}: {count}" for status, count in sorted(result["statuses"].items(), key=str))
    rate = len(answered) / result["elapsed"]
    unexpected = sum(result["unexpected"].values())
    line = (f"| {setting} | {route} | {total} | {rate:.1f} | {p50 or float('nan'):.0f} | {p99 or float('nan'):.0f} | {statuses} | "
            f"{unexpected} | {rate / bare:.2f} |")
    return {"embedder": setting, "route": route, "requests": total, "answered_per_s": rate, "p50_ms": p50, "p99_ms": p99,
            "statuses": {str(status): count for status, count in result["statuses"].items()}, "other_errors": unexpected,
            "share_of_bare": rate / bare, "cores": result["cores"], "processes": result["processes"], "line": line,
            "cores_line": f"| {setting} | {route} | " + " | ".join(f"{cores:.2f}" for cores in result["cores"].values())
                          + f" | {result['processes']['Embedder']} |"}


CORES_HEADER = ("Cores used on average while each route was loaded (CPU seconds / wall seconds, by process group):\n\n"
                "| Embedder | route | clients | proxy | ingress | Embedder | no-op | other processes | idle | Embedder replicas |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n")


def run_app(args, setting: EmbedderSetting | None, bodies: dict[str, list[dict]]) -> dict[str, dict]:
    """`serve run` of serve.config on the fake upstream (with the Embedder's `setting`), each route loaded, then stopped."""
    upstream_port, app_port = _free_port(), _free_port()
    upstream = multiprocessing.get_context("spawn").Process(target=run_fake_upstream, args=(upstream_port,), daemon=True)
    upstream.start()
    base = f"http://127.0.0.1:{app_port}"
    with tempfile.TemporaryDirectory() as folder:
        config = write_serve_config(Path(folder), args.artifact.resolve(), f"http://127.0.0.1:{upstream_port}/v1", app_port, setting)
        # A Ray of its own (RAY_ADDRESS=local), so the run never lands on another cluster of the machine.
        server = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(config)], cwd=REPO,
                                  env={**os.environ, "RAY_ADDRESS": "local",
                                       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "benchmarks"), os.environ.get("PYTHONPATH")]))},
                                  stdout=subprocess.DEVNULL,
                                  stderr=open(Path(folder) / "serve.log", "w"))
        try:
            asyncio.run(wait_until_up(base, args.start_timeout))
            # Warm-up at full load: connections, caches, and the replicas autoscaling adds under it.
            asyncio.run(load(f"{base}/v1/route", bodies["/v1/route"], args.clients, args.warmup))
            return {route: measured_load(f"{base}{route}", bodies[route], args.clients, args.duration) for route in args.routes}
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
            upstream.terminate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60, help="seconds per route")
    parser.add_argument("--warmup", type=float, default=15, help="seconds of load on /v1/route before measuring")
    parser.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "llmrouter_9model")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for the app to come up")
    parser.add_argument("--prompts", type=int, default=200, help="test-split prompts to cycle through")
    parser.add_argument("--out", type=Path, help="folder for report.json and report.md")
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES,
                        help="/noop/ is Serve's floor: the same request to a deployment that does nothing")
    parser.add_argument("--embedder", nargs="+", type=EmbedderSetting.parse, default=[None], metavar="SIZE:WAIT_S:ONGOING[:THREADS]",
                        help="Embedder settings to sweep, one app each (default: serve.config's)")
    args = parser.parse_args()

    from serve.core.artifact import RouterArtifact

    prompts = test_prompts(args.prompts)
    bodies = {"/v1/route": [{"prompt": prompt} for prompt in prompts], "/noop/": [{"prompt": prompt} for prompt in prompts],
              "/v1/chat/completions": [{"model": "router", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16}
                                       for prompt in prompts]}
    # The baseline first, on idle cores; each setting's rows as soon as they are measured.
    bare = bare_batched_encode(prompts, RouterArtifact.load(args.artifact).embedder)
    print(f"\n{os.cpu_count()} CPUs, {args.clients} clients for {args.duration:g} s per route, loopback, {len(prompts)} "
          f"test-split prompts of llmrouter_9model; latency of the answered (200) requests. Bare batched encode of the "
          f"same prompts in one process, {os.cpu_count()} threads: {bare:.1f} prompts/s; goal for /v1/route: >= {GOAL}x "
          f"of it\n", flush=True)
    print("| Embedder | route | requests | answered/s | p50 ms | p99 ms | statuses | other errors | answered / bare encode |\n"
          "|---|---|---|---|---|---|---|---|---|", flush=True)
    results, rows = {}, []
    for setting in args.embedder:
        results[setting] = run_app(args, setting, bodies)
        for route, result in results[setting].items():
            rows.append(report(str(setting or "serve.config"), route, result, bare))
            print(rows[-1]["line"], flush=True)
    print("\n" + CORES_HEADER + "\n".join(row["cores_line"] for row in rows), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        header = (f"`python benchmarks/bench_load.py {' '.join(sys.argv[1:])}`: {os.cpu_count()} CPUs, {args.clients} clients, "
                  f"{args.duration:g} s per route; bare batched encode {bare:.1f} prompts/s ({os.cpu_count()} threads); goal "
                  f">= {GOAL}x of it on /v1/route\n\n| Embedder | route | requests | answered/s | p50 ms | p99 ms | statuses | "
                  f"other errors | answered / bare encode |\n|---|---|---|---|---|---|---|---|---|\n")
        (args.out / "report.md").write_text(header + "\n".join(row["line"] for row in rows) + "\n\n" + CORES_HEADER
                                            + "\n".join(row["cores_line"] for row in rows) + "\n")
        report_json = {"argv": sys.argv[1:], "bare_prompts_per_s": bare, "goal": GOAL,
                       "rows": [{name: value for name, value in row.items() if not name.endswith("line")} for row in rows]}
        (args.out / "report.json").write_text(json.dumps(report_json, indent=1) + "\n")
    return 1 if any(result["unexpected"] for by_route in results.values() for result in by_route.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
