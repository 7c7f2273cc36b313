"""Serving load: HTTP throughput at concurrency 1 and 8 against in-process generation, same run.

    python benchmarks/serve_load.py [--checkpoint DIR] [--requests 32] [--max-tokens 64]

Deploys the serve stage (one replica with --num-cpus CPUs, GPU when there is one) on a local
Ray and sends completion requests through HTTP one at a time (sequential baseline) and 8 at a
time, alternating, twice each. Every request is greedy and generates exactly --max-tokens
tokens (min_tokens = max_tokens), so the runs do the same work. The in-process baseline runs
the same DecodeEngine in this process, without Serve and HTTP, 8 requests at a time, with the
replica's thread count, before and after the HTTP runs. Each figure is the best of its two
runs (the machine may be shared); errors are summed over all runs.
Goals: batching_ratio (tokens/s at concurrency 8 over sequential) >= 3; serve_vs_inprocess
(Serve + HTTP over in-process, both at concurrency 8) >= 0.8; no errors.
Prints progress, then one JSON line.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

GOALS = {"batching_ratio": 3.0, "serve_vs_inprocess": 0.8, "errors": 0}
PROMPTS = [
    "First Citizen:\n", "话说天下大势，", "The history of the Roman Empire", "def fibonacci(n):\n",
    "In the beginning", "天下之事，", "Once upon a time, in a land far away,", "The weather today is",
]


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def best(runs: list[dict]) -> dict:
    """The run with the highest tokens/s (the one least disturbed by other load)."""
    return max(runs, key=lambda r: r["tokens_per_s"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_http(url: str, model: str, n: int, concurrency: int, max_tokens: int) -> dict:
    import requests

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))

    def one(i: int) -> tuple[int, float, int]:
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                "min_tokens": max_tokens, "temperature": 0}
        t = time.perf_counter()
        try:
            r = session.post(f"{url}/v1/completions", json=body, timeout=600)
        except requests.RequestException:
            return 0, time.perf_counter() - t, 0
        tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
        return r.status_code, time.perf_counter() - t, tokens

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    seconds = time.perf_counter() - start
    latencies = [lat * 1000 for code, lat, _ in results if code == 200]
    tokens = sum(t for *_, t in results)
    return {"requests_per_s": round(n / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "errors": sum(code != 200 for code, *_ in results),
            "p50_ms": round(percentile(latencies, 0.5), 1) if latencies else None,
            "p99_ms": round(percentile(latencies, 0.99), 1) if latencies else None, "seconds": round(seconds, 2)}


def decode_load(model, tokenizer, queries: list, n: int, concurrency: int, max_tokens: int, warmup: bool = True) -> dict:
    """The serve stage's DecodeEngine (continuous batching) in this process, without Serve and
    HTTP: `n` greedy requests of exactly `max_tokens` tokens sent `concurrency` at a time from
    threads. Tokens/s, mean batch size, and per-token latency (the gaps between a request's
    consecutive tokens, all requests pooled) and time to first token, p50 / p99 in ms."""
    from glm.generation import GenerationConfig
    from stages.serve.engine import DecodeEngine, wait_for

    class TimedEngine(DecodeEngine):
        """Stamps every token as the engine records it (the engine's own code path otherwise)."""

        def _advance(self, row, token, *args):
            row.request.token_times.append(time.perf_counter())
            return super()._advance(row, token, *args)

        def submit(self, request):
            request.token_times, request.submitted = [], time.perf_counter()
            self.requests.append(request)
            return super().submit(request)

    engine = TimedEngine(model, tokenizer, max_batch_size=concurrency, max_waiting=n)
    engine.requests = []
    config = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens)
    try:
        if warmup:
            wait_for(engine, queries[0], config)
        engine.stats.clear()
        engine.requests.clear()
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            events = list(pool.map(lambda i: wait_for(engine, queries[i % len(queries)], config), range(n)))
        seconds = time.perf_counter() - start
        mean_batch = engine.stats["batch_rows"] / max(1, engine.stats["steps"])
    finally:
        engine.close()
    tokens = sum(len(e.tokens) for e in events)
    gaps = [(b - a) * 1000 for r in engine.requests for a, b in zip(r.token_times, r.token_times[1:])]
    first = [(r.token_times[0] - r.submitted) * 1000 for r in engine.requests if r.token_times]
    return {"requests_per_s": round(n / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "mean_batch_size": round(mean_batch, 2), "seconds": round(seconds, 2),
            "errors": sum(e.finish_reason == "error" for e in events),
            "token_p50_ms": round(percentile(gaps, 0.5), 2) if gaps else None,
            "token_p99_ms": round(percentile(gaps, 0.99), 2) if gaps else None,
            "first_token_p50_ms": round(percentile(first, 0.5), 1) if first else None,
            "first_token_p99_ms": round(percentile(first, 0.99), 1) if first else None}


def run_inprocess(checkpoint: str, device: str, threads: int, n: int, concurrency: int, max_tokens: int) -> dict:
    import torch

    from glm.checkpoint import load_inference_checkpoint
    from stages.serve.protocol import generation_query

    torch.set_num_threads(threads)
    model, tokenizer = load_inference_checkpoint(checkpoint, device=device)
    queries = [generation_query(tokenizer, p) for p in PROMPTS]
    r = decode_load(model, tokenizer, queries, n, concurrency, max_tokens)
    return {k: r[k] for k in ("requests_per_s", "tokens_per_s", "mean_batch_size", "seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="inference checkpoint (default: the newest under ./runs)")
    parser.add_argument("--requests", type=int, default=32, help="requests at concurrency 8 (sequential: a quarter)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--num-cpus", type=float, default=float(os.cpu_count() or 2), help="CPUs of the replica")
    args = parser.parse_args()

    import torch

    from stages.cluster import ensure_ray
    from stages.serve import ServeConfig, deploy, newest_checkpoint, shutdown

    checkpoint = args.checkpoint or str(newest_checkpoint())
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    threads = max(1, int(args.num_cpus))
    n8, n1 = args.requests, max(4, args.requests // 4)
    print(f"checkpoint {checkpoint} on {device}, {threads} thread(s); {n1} sequential and {n8} concurrent "
          f"requests of {args.max_tokens} tokens", flush=True)

    load_start = os.getloadavg()[0]  # other work on the machine skews every figure: recorded
    print("in-process engine, concurrency 8 ...", flush=True)
    inprocess_runs = [run_inprocess(checkpoint, device, threads, n8, 8, args.max_tokens)]
    print(f"  {inprocess_runs[0]}", flush=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ensure_ray(min_cpus=threads)
    t = time.perf_counter()
    url = deploy(ServeConfig(checkpoint=checkpoint, port=port, num_cpus=args.num_cpus, num_gpus=1 if gpu else 0,
                             max_batch_size=8, max_waiting=max(64, n8)))
    print(f"deployed at {url} in {time.perf_counter() - t:.1f}s", flush=True)
    try:
        run_http(url, "glm", 2, 1, 4)  # warm-up
        runs: dict[int, list[dict]] = {1: [], 8: []}
        for round_ in (1, 2):  # alternated, so a change in the machine's load hits both alike
            for concurrency, n in ((1, n1), (8, n8)):
                print(f"HTTP, concurrency {concurrency}, round {round_} ...", flush=True)
                runs[concurrency].append(run_http(url, "glm", n, concurrency, args.max_tokens))
                print(f"  {runs[concurrency][-1]}", flush=True)
    finally:
        shutdown()
    print("in-process engine again, concurrency 8 ...", flush=True)
    inprocess_runs.append(run_inprocess(checkpoint, device, threads, n8, 8, args.max_tokens))
    print(f"  {inprocess_runs[1]}", flush=True)
    inprocess = best(inprocess_runs)
    sequential, concurrent = best(runs[1]), best(runs[8])
    errors = sum(r["errors"] for r in runs[1] + runs[8])

    result = {
        "benchmark": "serve_load", "checkpoint": checkpoint, "device": device, "replica_cpus": args.num_cpus,
        "max_tokens": args.max_tokens, "requests": {"c1": n1, "c8": n8},
        "c1_requests_per_s": sequential["requests_per_s"], "c1_tokens_per_s": sequential["tokens_per_s"],
        "c8_requests_per_s": concurrent["requests_per_s"], "c8_tokens_per_s": concurrent["tokens_per_s"],
        "inprocess_c8_tokens_per_s": inprocess["tokens_per_s"], "inprocess_mean_batch_size": inprocess["mean_batch_size"],
        "batching_ratio": ratio(concurrent["tokens_per_s"], sequential["tokens_per_s"]),
        "serve_vs_inprocess": ratio(concurrent["tokens_per_s"], inprocess["tokens_per_s"]),
        "errors": errors,
        "p50_ms": concurrent["p50_ms"], "p99_ms": concurrent["p99_ms"],
        "c1_p50_ms": sequential["p50_ms"], "c1_p99_ms": sequential["p99_ms"],
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)], "cpus": os.cpu_count(),
        "goals": GOALS,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
