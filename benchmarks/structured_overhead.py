"""Structured output's per-token cost: llguidance's mask (compute + apply) and token consumption.

    python benchmarks/structured_overhead.py [--checkpoint DIR] [--documents 20]

Loads only the checkpoint's tokenizer (default: the newest inference checkpoint under ./runs)
and builds the replica's grammar compiler from it (`stages.serve.structured.Grammars`: the
tokenizer adapter), compiles the conformance schemas (`openai_conformance.SCHEMAS`, plus any
JSON object), then walks `--documents` documents per schema token by token the way the decode
loop does: the row's mask is computed and applied to (1, padded vocab) fp32 logits
(`GrammarMatcher.mask`), a token is drawn among the allowed ones from random logits, and the
matcher consumes it. Timed per token, on one CPU thread: mask (compute + apply), consume, and
for scale the unconstrained sampling of the same row (`glm.generation.process_logits` +
`sample_next`, top-p sampling) that every row pays anyway. Prints progress, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))

MAX_TOKENS = 200
"""Most tokens walked per document (the json_object walk has unbounded strings)."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="inference checkpoint whose tokenizer to use (default: newest under ./runs)")
    parser.add_argument("--documents", type=int, default=20, help="documents walked per schema")
    args = parser.parse_args()

    import torch

    from glm.config import padded_vocab_size
    from glm.generation import GenerationConfig, process_logits, sample_next
    from glm.tokenizer import GLMTokenizer
    from openai_conformance import SCHEMAS
    from stages.serve import newest_checkpoint
    from stages.serve.structured import ANY_JSON_OBJECT, LLGUIDANCE, Grammars

    torch.set_num_threads(1)
    checkpoint = args.checkpoint or str(newest_checkpoint())
    tokenizer = GLMTokenizer.load(Path(checkpoint) / GLMTokenizer.MODEL_FILE)
    width = padded_vocab_size(len(tokenizer))
    print(f"tokenizer of {checkpoint}: {len(tokenizer)} tokens (logits width {width})", flush=True)

    t = time.perf_counter()
    grammars = Grammars(tokenizer)
    adapter_ms = (time.perf_counter() - t) * 1e3
    schemas = {**SCHEMAS, "json_object": ANY_JSON_OBJECT}
    compiled, compile_ms = {}, {}
    for name, schema in schemas.items():
        t = time.perf_counter()
        compiled[name] = grammars.compile(schema)
        grammars.matcher(compiled[name])
        compile_ms[name] = round((time.perf_counter() - t) * 1e3, 2)
    print(f"adapter {adapter_ms:.0f} ms; compile + first matcher (ms): {compile_ms}", flush=True)

    generator = torch.Generator().manual_seed(0)
    config = GenerationConfig(do_sample=True, top_p=0.9, max_new_tokens=MAX_TOKENS)
    history = tokenizer.encode("Describe it as JSON:")
    mask_us, consume_us, sampling_us, completed = [], [], [], 0
    for name, grammar in compiled.items():
        for _ in range(args.documents):
            matcher = grammars.matcher(grammar)
            generated: list[int] = []
            while len(generated) < MAX_TOKENS and not matcher.complete:
                raw = torch.randn(1, width, generator=generator)
                t0 = time.perf_counter()
                logits = process_logits(raw.clone(), [history + generated], len(generated), grammars.end_ids,
                                        config, len(tokenizer))
                sample_next(logits, config, generator)
                t1 = time.perf_counter()
                logits = matcher.mask(raw)
                t2 = time.perf_counter()
                token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
                t3 = time.perf_counter()
                matcher.consume(token)
                t4 = time.perf_counter()
                sampling_us.append((t1 - t0) * 1e6)
                mask_us.append((t2 - t1) * 1e6)
                consume_us.append((t4 - t3) * 1e6)
                generated.append(token)
            completed += matcher.complete
        print(f"{name}: {len(mask_us)} tokens so far, mask mean {statistics.mean(mask_us):.1f} us", flush=True)
    import llguidance

    overhead = [m + c for m, c in zip(mask_us, consume_us)]
    result = {
        "benchmark": "structured_overhead", "library": f"llguidance=={llguidance.__version__}", "pinned": LLGUIDANCE,
        "checkpoint": checkpoint, "vocab": len(tokenizer), "logits_width": width, "tokens": len(overhead),
        "documents": len(compiled) * args.documents, "documents_completed": completed,
        "adapter_ms": round(adapter_ms, 1), "compile_ms": compile_ms,
        "mask_us_mean": round(statistics.mean(mask_us), 1), "mask_us_p50": round(percentile(mask_us, 0.5), 1),
        "mask_us_p99": round(percentile(mask_us, 0.99), 1), "consume_us_mean": round(statistics.mean(consume_us), 1),
        "overhead_us_per_token": round(statistics.mean(overhead), 1),
        "overhead_us_p99": round(percentile(overhead, 0.99), 1),
        "sampling_us_per_token": round(statistics.mean(sampling_us), 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + ", 1 torch thread",
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
