"""Serving under abuse: normal requests keep their latency while hostile clients hammer the endpoint.

    python benchmarks/serve_abuse.py [--checkpoint DIR] [--hostile 1200] [--workers 6] [--seed 0]

Starts the serve stage on a local Ray (the smoke checkpoint runs/smoke/sft/model, or
--checkpoint; without either, a randomly initialised `small` GLM with a tokenizer trained on
the shipped sample corpus, the smoke run's shapes) bound to 127.0.0.1 with an API key. Every
request goes to 127.0.0.1.

1. quiet: --normal-quiet normal chat requests (greedy, 8 tokens) one after another: their p50
   latency is `normal_p50_latency_s_quiet`;
2. abuse: --workers threads send --hostile generated hostile requests (random JSON shapes, extreme
   and non-finite parameter values, lone surrogates, invalid UTF-8, bad or lower-case keys,
   giant bodies up to 20 MB with and without Content-Length, stop strings too many or too long,
   control strings in chat / completion / fill text, fills with hundreds of masks, n x prompts
   beyond capacity, beam-search floods, streams and bodies abandoned mid-way) while one client
   sends the same normal requests one after another; every answer's status is counted;
3. beam flood (issue 17's case): 8 requests of num_beams 8, max_tokens 500 (min_tokens 500) are
   sent at once, then normal requests one after another for --flood-seconds; their worst
   latency is `beam_flood_max_normal_latency_s` (the flood's clients then leave, which cancels
   the searches);
4. after: one normal request (`alive_after`).

Bounded: the hostile count, each request's timeout (--request-timeout) and the whole run
(--max-seconds: the abuse phase stops sending when it is reached).
Goal (issue 17): normal_failed 0, server_errors 0, alive_after true, and max_normal_latency_s
<= 10 x normal_p50_latency_s_quiet + 2. Prints progress, then one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

REPO = Path(__file__).resolve().parent.parent
KEY = "abuse-bench-key"
MODEL = "glm"
CONTROL = ["[MASK]", "[sMASK]", "[gMASK]", "[sop]", "[eop]", "</s>", "<pad>", "<unk>"]
NORMAL_PROMPTS = ["你好", "Hello, who are you?", "介绍一下你自己", "What is the capital of France?"]
EXTREMES = [2**64, 2**64 - 1, 2**100, -1, -(2**63), 0, 10**9, 1e308, 1e-300, -1e-300, 0.5, "many", "", [], {},
            None, True, [1, 2], {"a": 1}, "x" * 1000]
RAW_EXTREMES = ["NaN", "Infinity", "-Infinity", "1e999", "-0", "123456789012345678901234567890"]
FIELDS = ["max_tokens", "temperature", "top_p", "n", "seed", "top_k", "num_beams", "length_penalty",
          "no_repeat_ngram_size", "min_tokens", "stop", "stream", "echo", "stream_options", "user",
          "max_completion_tokens", "model", "logprobs", "frequency_penalty", "presence_penalty", "repetition_penalty",
          "min_p", "logit_bias", "top_logprobs", "stop_token_ids"]
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/glm/fill"]


# --- the checkpoint ----------------------------------------------------------------------


def build_checkpoint(directory: Path) -> str:
    """A randomly initialised `small` GLM (the smoke run's model shape) with a tokenizer trained
    on the shipped sample corpus, as an inference checkpoint."""
    import torch

    from glm.checkpoint import save_inference_checkpoint
    from glm.config import padded_vocab_size, preset
    from glm.model import GLMModel
    from glm.tokenizer import train_tokenizer

    texts = []
    for path in sorted((REPO / "data" / "sample" / "pretrain").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for _, line in zip(range(40), f)]
    tokenizer = train_tokenizer(texts, vocab_size=8000, character_coverage=0.995)
    torch.manual_seed(0)
    model = GLMModel(preset("small", vocab_size=padded_vocab_size(len(tokenizer)))).eval()
    return save_inference_checkpoint(model, tokenizer, directory / "model", metadata={"stage": "serve_abuse"})


# --- requests ----------------------------------------------------------------------------


def normal_body(i: int) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": NORMAL_PROMPTS[i % len(NORMAL_PROMPTS)]}],
            "max_tokens": 8, "min_tokens": 8, "temperature": 0}


def raw_http(port: int, payload: bytes, read: bool = True, timeout: float = 30) -> int | None:
    """Send raw bytes; the status of the answer (None when the server closed without one or
    `read` is False: the client left)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        if not read:
            return None
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return None
            data += chunk
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def request_bytes(route: str, body: bytes, headers: dict[str, str] | None = None, length: int | None = None) -> bytes:
    head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
            "Content-Length": str(len(body) if length is None else length), "Connection": "close", **(headers or {})}
    return (f"POST {route} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode() + body


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 2**31, 2**63, 2**64, -(2**70), rng.randrange(-10**6, 10**6)])
    if kind == 2:
        return rng.choice([0.0, -0.0, 1e-300, 1e308, rng.uniform(-1e6, 1e6)])
    if kind == 3:
        return rng.choice(["", "hi", "\u4f60\u597d", rng.choice(CONTROL), "\x00\x01", "a" * rng.randrange(1, 5000)])
    if kind == 4:
        return rng.choice(FIELDS)
    if kind in (5, 6):
        keys = rng.sample(FIELDS + ["messages", "prompt", "text", "role", "content", "\u00e9", ""], rng.randrange(0, 6))
        return {k: random_json(rng, depth + 1) for k in keys}
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))]


class Hostile:
    """Generates hostile requests: each `make(i)` returns (kind, thunk); the thunk performs the
    request and returns its HTTP status (None when the client deliberately left)."""

    def __init__(self, url: str, port: int, seed: int, timeout: float):
        self.url, self.port, self.timeout = url, port, timeout
        self.rng = random.Random(seed)
        self.kinds = [  # (weight, name, builder)
            (14, "random_json", self.random_shape), (16, "extreme_value", self.extreme_value),
            (6, "raw_non_finite", self.raw_non_finite), (8, "control_strings", self.control_strings),
            (6, "surrogate", self.surrogate), (4, "invalid_utf8", self.invalid_utf8), (6, "auth", self.auth),
            (3, "giant_body", self.giant_body), (2, "giant_chunked", self.giant_chunked),
            (4, "stops", self.stops), (4, "fill_masks", self.fill_masks), (3, "capacity", self.capacity),
            (5, "beam_flood", self.beam_flood), (5, "disconnect_stream", self.disconnect_stream),
            (3, "partial_body", self.partial_body), (4, "malformed_json", self.malformed_json),
            (3, "wrong_route", self.wrong_route), (4, "long_prompt", self.long_prompt),
        ]

    def make(self) -> tuple[str, callable]:
        weights = [w for w, _, _ in self.kinds]
        _, name, build = self.rng.choices(self.kinds, weights)[0]
        return name, build(random.Random(self.rng.random()))

    # each builder returns a thunk -> status | None

    def post(self, route: str, body=None, data: bytes | None = None, headers=None, **kw):
        import requests

        h = {"Authorization": f"Bearer {KEY}", **({"Content-Type": "application/json"} if data is not None else {}),
             **(headers or {})}
        return lambda: requests.post(self.url + route, json=body if data is None else None, data=data, headers=h,
                                     timeout=self.timeout, **kw).status_code

    def random_shape(self, rng):
        return self.post(rng.choice(ROUTES), random_json(rng))

    def base(self, rng, route: str) -> dict:
        if route == "/v1/chat/completions":
            return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        if route == "/v1/completions":
            return {"model": MODEL, "prompt": "hi", "max_tokens": 4}
        return {"text": "a [MASK] b", "max_tokens": 4}

    def extreme_value(self, rng):
        route = rng.choice(ROUTES)
        body = self.base(rng, route)
        for _ in range(rng.randrange(1, 4)):
            body[rng.choice(FIELDS)] = rng.choice(EXTREMES)
        body.setdefault("max_tokens", 4)
        if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
            body["max_tokens"] = max(1, min(body["max_tokens"], 16)) if body["max_tokens"] > 0 else body["max_tokens"]
        return self.post(route, body)

    def raw_non_finite(self, rng):
        field = rng.choice(["temperature", "top_p", "length_penalty", "seed", "top_k", "max_tokens", "n"])
        data = ('{"model": "glm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, '
                f'"{field}": {rng.choice(RAW_EXTREMES)}}}').encode()
        return self.post("/v1/chat/completions", data=data)

    def control_strings(self, rng):
        text = " ".join(rng.choice(CONTROL + ["word", "\u5b57"]) for _ in range(rng.randrange(1, 12)))
        route = rng.choice(ROUTES)
        body = self.base(rng, route)
        key = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/glm/fill": "text"}[route]
        body[key] = [{"role": "user", "content": text}] if key == "messages" else text
        return self.post(route, body)

    def surrogate(self, rng):
        where = rng.choice(["content", "key", "stop", "prompt"])
        s = rng.choice(["\\ud800", "\\udfff", "a\\ud83d", "\\udc00b"])
        if where == "content":
            data = f'{{"model": "glm", "messages": [{{"role": "user", "content": "{s}"}}]}}'
            route = "/v1/chat/completions"
        elif where == "key":
            data = f'{{"model": "glm", "prompt": "hi", "{s}": 1}}'
            route = "/v1/completions"
        elif where == "stop":
            data = f'{{"model": "glm", "prompt": "hi", "max_tokens": 4, "stop": ["{s}"]}}'
            route = "/v1/completions"
        else:
            data = f'{{"text": "x{s} [MASK]", "max_tokens": 4}}'
            route = "/v1/glm/fill"
        return self.post(route, data=data.encode())

    def invalid_utf8(self, rng):
        data = b'{"model": "glm", "prompt": "\xff\xfe\xc3(", "max_tokens": 4}'
        return self.post("/v1/completions", data=data)

    def auth(self, rng):
        headers = rng.choice([{"Authorization": "Bearer wrong"}, {"Authorization": ""}, {"Authorization": "Basic eDp5"},
                              {"Authorization": f"bearer {KEY}"}, {"Authorization": f"BEARER  {KEY} "},
                              {"Authorization": "Bearer " + "k" * 10_000}, {"Authorization": f"Bearer {KEY}\u00e9"}])
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
        route = rng.choice(["/v1/chat/completions", "/docs", "/openapi.json", "/v1/models"])
        if route != "/v1/chat/completions":
            import requests

            return lambda: requests.get(self.url + route, headers=headers, timeout=self.timeout).status_code
        try:
            headers["Authorization"].encode("latin-1")
        except UnicodeEncodeError:
            return lambda: raw_http(self.port, request_bytes(route, json.dumps(body).encode(),
                                                             {"Authorization": headers["Authorization"].encode("utf-8")
                                                              .decode("latin-1")}))
        return self.post(route, body, headers=headers)

    def giant_body(self, rng):
        size = rng.choice([1_100_000, 2_000_000, 20_000_000])
        unit = rng.choice(["x", "\u5b57", "[MASK]"])
        prompt = unit * (size // len(unit.encode()))  # a body of about `size` bytes
        data = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 4}, ensure_ascii=False).encode()
        return self.post("/v1/completions", data=data)

    def giant_chunked(self, rng):
        data = b'{"model": "glm", "prompt": "' + b"y" * rng.choice([1_500_000, 5_000_000]) + b'"}'

        def chunks():
            for i in range(0, len(data), 1 << 16):
                yield data[i:i + (1 << 16)]

        return self.post("/v1/completions", data=chunks())

    def stops(self, rng):
        stop = rng.choice([["a"] * 5, ["x" * 300], "y" * 2_000, [""], ["a", 5], [["nested"]]])
        return self.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stop": stop})

    def fill_masks(self, rng):
        masks = rng.choice([50, 200, 1000])
        body = {"text": "[MASK] " * masks, "temperature": 0}
        if rng.random() < 0.7:
            body["max_tokens"] = rng.choice([1, 16, 256])
        return self.post("/v1/glm/fill", body)

    def capacity(self, rng):
        return self.post("/v1/completions", {"model": MODEL, "prompt": ["p"] * rng.choice([10, 16]),
                                             "n": 8, "max_tokens": 4})

    def beam_flood(self, rng):
        import requests

        body = {"model": MODEL, "prompt": rng.choice(NORMAL_PROMPTS), "num_beams": 8,
                "max_tokens": rng.choice([32, 64, 200]), "min_tokens": 16}
        wait = rng.choice([0.5, 2.0, self.timeout])  # most leave early: the disconnect must cancel the search

        def go():
            try:
                return requests.post(self.url + "/v1/completions", json=body, timeout=wait,
                                     headers={"Authorization": f"Bearer {KEY}"}).status_code
            except requests.Timeout:
                return None
        return go

    def disconnect_stream(self, rng):
        import requests

        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "min_tokens": 200, "stream": True,
                "n": rng.choice([1, 4, 8])}

        def go():
            with requests.post(self.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                               stream=True, timeout=self.timeout) as r:
                if r.status_code != 200:
                    return r.status_code
                for line in r.iter_lines():
                    if line.startswith(b"data: "):
                        break
            return None  # left after the first chunk
        return go

    def partial_body(self, rng):
        body = json.dumps(normal_body(0)).encode()
        cut = body[: rng.randrange(1, len(body))]
        return lambda: raw_http(self.port, request_bytes("/v1/chat/completions", cut, length=len(body)), read=False)

    def malformed_json(self, rng):
        data = rng.choice([b"{not json", b"", b"[]", b"null", b'{"model": "glm", "messages": [', b"\x00" * 100,
                           b'{"model": "glm", "prompt": "hi", "prompt": 5}', b"{" * 5000 + b"}" * 5000])
        return self.post(rng.choice(ROUTES), data=data)

    def wrong_route(self, rng):
        import requests

        path = rng.choice(["/v1/nothing", "/v1/chat/completions/x", "/../../etc/passwd", "/v1/embeddings", "/%ff"])
        method = rng.choice(["GET", "POST", "PUT", "DELETE"])
        return lambda: requests.request(method, self.url + path, headers={"Authorization": f"Bearer {KEY}"},
                                        timeout=self.timeout).status_code

    def long_prompt(self, rng):
        text = rng.choice(["word ", "\u5b57", "\n", " "]) * rng.choice([2_000, 50_000, 200_000])
        return self.post("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 4})


# --- the run -----------------------------------------------------------------------------


def timed_normal(url: str, i: int, timeout: float) -> tuple[int, float]:
    import requests

    t = time.perf_counter()
    try:
        code = requests.post(f"{url}/v1/chat/completions", json=normal_body(i), timeout=timeout,
                             headers={"Authorization": f"Bearer {KEY}"}).status_code
    except requests.RequestException:
        code = 0
    return code, time.perf_counter() - t


def beam_flood(url: str, seconds: float, timeout: float) -> list[tuple[int, float]]:
    """8 beam searches (8 beams, 500 tokens each) at once, then normal requests for `seconds`."""
    import requests

    body = {"model": MODEL, "prompt": "The history of", "num_beams": 8, "max_tokens": 500, "min_tokens": 500}
    left = threading.Event()

    def flooder(_):
        try:
            requests.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=seconds + 5)
        except requests.RequestException:
            pass  # the client leaves: the server cancels the search
        left.set()

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(flooder, i) for i in range(8)]
        time.sleep(1.0)  # let the searches start
        results, end, i = [], time.monotonic() + seconds, 0
        while time.monotonic() < end:
            results.append(timed_normal(url, i, timeout))
            i += 1
        for f in futures:
            f.result()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="inference checkpoint (default: runs/smoke/sft/model, else a random "
                                             "small GLM built here)")
    parser.add_argument("--hostile", type=int, default=1200, help="hostile requests to send (>= 1000 for the goal)")
    parser.add_argument("--workers", type=int, default=6, help="concurrent hostile clients")
    parser.add_argument("--normal-quiet", type=int, default=20, help="normal requests in the quiet phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=60.0, help="client timeout of one request (s)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="bound of the abuse phase (s)")
    parser.add_argument("--flood-seconds", type=float, default=15.0, help="length of the beam-flood phase (s)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the replica")
    args = parser.parse_args()

    import torch

    from stages.cluster import ensure_ray
    from stages.serve import ServeConfig, deploy, shutdown

    tmp = tempfile.TemporaryDirectory()
    checkpoint = args.checkpoint
    smoke = REPO / "runs" / "smoke" / "sft" / "model"
    if checkpoint is None and (smoke / "config.json").is_file():
        checkpoint = str(smoke)
    built = checkpoint is None
    if built:
        print("no smoke checkpoint: building a random `small` GLM ...", flush=True)
        checkpoint = build_checkpoint(Path(tmp.name))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import ray

    if not ray.is_initialized():  # the replica's request log would drown the progress lines
        ray.init(num_cpus=max(os.cpu_count() or 2, int(args.num_cpus) + 1), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    ensure_ray(min_cpus=int(args.num_cpus) + 1)
    config = ServeConfig(checkpoint=str(checkpoint), host="127.0.0.1", port=port, api_key=KEY, model_name=MODEL,
                         num_cpus=args.num_cpus, num_gpus=1 if torch.cuda.is_available() else 0, max_batch_size=8,
                         max_waiting=64, max_beam_requests=2, default_max_tokens=64,
                         request_timeout_s=args.request_timeout)
    t = time.perf_counter()
    url = deploy(config)
    print(f"deployed {checkpoint} at {url} in {time.perf_counter() - t:.1f}s", flush=True)
    load_start = os.getloadavg()[0]
    try:
        for i in range(3):
            timed_normal(url, i, args.request_timeout)  # warm-up
        quiet = [timed_normal(url, i, args.request_timeout) for i in range(args.normal_quiet)]
        quiet_p50 = statistics.median(lat for _, lat in quiet)
        print(f"quiet: p50 {quiet_p50:.3f}s, max {max(lat for _, lat in quiet):.3f}s, "
              f"codes {collections.Counter(c for c, _ in quiet)}", flush=True)

        hostile = Hostile(url, port, args.seed, args.request_timeout)
        statuses: collections.Counter = collections.Counter()
        by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        errors: collections.Counter = collections.Counter()
        sent = 0
        lock = threading.Lock()
        stop_at = time.monotonic() + args.max_seconds
        abuse_over = threading.Event()
        normal: list[tuple[int, float]] = []

        def normal_client():
            i = 0
            while not abuse_over.is_set():
                normal.append(timed_normal(url, i, args.request_timeout))
                i += 1
                abuse_over.wait(0.1)

        def hostile_client(_):
            nonlocal sent
            while True:
                with lock:
                    if sent >= args.hostile or time.monotonic() > stop_at:
                        return
                    sent += 1
                    kind, thunk = hostile.make()
                try:
                    status = thunk()
                except Exception as e:  # noqa: BLE001 - a connection the server dropped, a client timeout
                    status = f"client:{type(e).__name__}"
                with lock:
                    statuses[status] += 1
                    by_kind[kind][status] += 1
                    if isinstance(status, int) and status >= 500:
                        errors[kind] += 1

        t = time.perf_counter()
        normals = threading.Thread(target=normal_client)
        normals.start()
        with cf.ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(hostile_client, range(args.workers)))
        abuse_over.set()
        normals.join()
        abuse_s = time.perf_counter() - t
        print(f"abuse: {sent} hostile requests in {abuse_s:.1f}s; statuses {dict(statuses)}", flush=True)
        for kind, counts in sorted(by_kind.items()):
            print(f"  {kind}: {dict(counts)}", flush=True)
        flood = beam_flood(url, args.flood_seconds, args.request_timeout)
        print(f"beam flood: normal requests {flood}", flush=True)
        code, lat = timed_normal(url, 0, args.request_timeout)
        alive_after = code == 200
    finally:
        shutdown()
        tmp.cleanup()

    latencies = [lat for _, lat in normal]
    max_normal = max(latencies) if latencies else None
    bound = 10 * quiet_p50 + 2
    result = {
        "benchmark": "serve_abuse", "checkpoint": "random small GLM (built)" if built else str(checkpoint),
        "hostile_requests": sent,
        "normal_requests": len(normal),
        "normal_failed": sum(code != 200 for code, _ in normal),
        "server_errors": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
        "max_normal_latency_s": round(max_normal, 3) if max_normal is not None else None,
        "normal_p50_latency_s": round(statistics.median(latencies), 3) if latencies else None,
        "normal_p50_latency_s_quiet": round(quiet_p50, 3),
        "latency_bound_s": round(bound, 3),
        "within_bound": max_normal is not None and max_normal <= bound,
        "alive_after": alive_after,
        "beam_flood_normal_requests": len(flood),
        "beam_flood_normal_failed": sum(code != 200 for code, _ in flood),
        "beam_flood_max_normal_latency_s": round(max(lat for _, lat in flood), 3) if flood else None,
        "server_errors_by_kind": dict(errors),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "abuse_seconds": round(abuse_s, 1), "workers": args.workers, "replica_cpus": args.num_cpus,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)], "cpus": os.cpu_count(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
