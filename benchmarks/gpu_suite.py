"""Every GPU figure of the project in one run of at most 8 minutes (issue 15).

    python benchmarks/gpu_suite.py              on one H100 / H200 (plain python3, repo root on the path)
    python benchmarks/gpu_suite.py --dry-run    every part at tiny shapes on CPU (CI; under 2 minutes)
    make bench-gpu

Parts, each in its own subprocess with its own time limit (killed when it runs over; what it
had measured is kept), under one overall wall-clock budget (--budget-s, default 480 s):

  1 pytest_gpu         `pytest -m gpu` on the test files that have GPU tests (counts)
  2 pretrain_mfu       MFU / HFU, tokens/s and peak memory of glm_350m and glm_1b at sequence 2048,
                       bf16 autocast, the model library's forward/backward and the engine's optimizer
                       (LocalEngine), eager and torch.compile (goal MFU >= 45%)
  3 quant_kernels      Triton W4A16 / W8A16 against fp16 and bf16 torch.matmul at batch 1/16/64 on the
                       chatglm_6b and glm_130b layer shapes (goals: >= 3x at batch 1, >= 2.5x at 16,
                       >= 75% of copy bandwidth), and decode tokens/s of a chatglm_6b-shaped model
                       (random weights) in fp16, INT8 and INT4
  4 serve_engine       the serve stage's DecodeEngine in-process (continuous batching, no Ray) on a
                       chatglm_6b-shaped model: tokens/s, per-token p50 / p99 at concurrency 1, 8, 32
                       (goal: >= 6x tokens/s at 32 over 1)
  5 batched_eval       batched multiple-choice scoring vs one item at a time (goal >= 3x)
  6 ppo_iteration      the RLHF stage's own ppo_iteration: generation / scoring / training split and
                       the KV-cache rollout speed-up
  7 engine_in_process  the training engine's loop in one process (stages.engine.fit_in_process) with
                       DeepSpeed ZeRO-2 (bf16 on CUDA, fp32 on CPU): a checkpoint, a kill (os._exit in a
                       subprocess) and a resume that must reproduce the losses bitwise; "skipped" only
                       where DeepSpeed cannot be imported

Nothing here imports Ray, DeepSpeed or MLflow except part 7 (DeepSpeed). Progress goes to the
console; the last line is one JSON object: per part its status (ok, skipped, failed, error,
timeout, interrupted), seconds and figures, and `goals` (each figure, its baseline from the same
run, the ratio and the goal). The same JSON is written after every part (partial results
survive an interruption) to --out (default runs/gpu_suite/<time>.json) and to $OUT/gpu_suite.json
when $OUT is set, with the whole console output in $OUT/gpu_suite.log.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
for _p in (str(BENCH), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# Testing / parity with the GPU machine: modules named here (comma-separated) are made
# unimportable in the suite and in every process it starts (sys.modules[name] = None).
BLOCK_ENV = "GPU_SUITE_BLOCK_IMPORTS"
for _name in filter(None, os.environ.get(BLOCK_ENV, "").split(",")):
    sys.modules[_name.strip()] = None  # type: ignore[assignment]

DEFAULT_BUDGET_S = 480.0
DRY_BUDGET_S = 115.0
# Peak dense bf16 FLOP/s (NVIDIA's figures without sparsity) by a part of the device name;
# the first match counts (PCIe / NVL boards before the SXM default of their family).
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835.5e12), ("H200 NVL", 835.5e12), ("H100", 989.4e12),
             ("H200", 989.4e12), ("H800", 989.4e12), ("A100", 312e12), ("A800", 312e12)]


@dataclass
class Part:
    number: int
    name: str
    limit_s: float
    """Wall-clock limit on the GPU."""
    dry_limit_s: float
    """Wall-clock limit in the dry run."""
    what: str


PARTS = [
    Part(1, "pytest_gpu", 60, 45, "pytest -m gpu"),
    Part(2, "pretrain_mfu", 110, 40, "pretraining MFU / HFU"),
    Part(3, "quant_kernels", 75, 40, "W4A16 / W8A16 kernels and quantized decoding"),
    Part(4, "serve_engine", 55, 30, "serve engine in-process"),
    Part(5, "batched_eval", 35, 30, "batched multiple-choice evaluation"),
    Part(6, "ppo_iteration", 45, 30, "one PPO iteration"),
    Part(7, "engine_in_process", 75, 75, "the engine in one process with DeepSpeed"),
]


def log(*args) -> None:
    print(*args, flush=True)


# --- the child side: one part in this process --------------------------------------------


class Recorder:
    """A part's figures, rewritten to its result file at every update (a killed part keeps them)."""

    def __init__(self, path: str):
        self.path, self.data = path, {"status": "running"}

    def update(self, **figures) -> None:
        self.data.update(figures)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


@dataclass
class Context:
    dry: bool
    device: str
    deadline: float
    """time.time() by which the part must be done (its limit); a part checks it between steps."""
    rec: Recorder
    args: argparse.Namespace

    def left(self) -> float:
        return self.deadline - time.time()


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    from train_throughput import sync

    sync(device)


def _peak_memory(device: str) -> dict:
    import resource

    import torch

    if device == "cuda":
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _special(vocab: int):
    """Special-token ids at the end of a random-weight model's vocabulary (no tokenizer needed)."""
    from glm.schema import SpecialTokens

    return SpecialTokens(mask=vocab - 7, smask=vocab - 6, gmask=vocab - 5, sop=vocab - 4, eop=vocab - 3, pad=vocab - 2,
                         eos=vocab - 1)


def synthetic_rows(n: int, seq_len: int, vocab: int, special, use_2d: bool, seed: int, token_limit: int | None = None):
    """n rows of the sample schema, each one [gMASK] sample of random tokens filling seq_len
    (half bidirectional Part A, half Part B with targets), as numpy int arrays."""
    import numpy as np

    from glm.schema import COLUMNS, layout_gmask, pack_samples

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        tokens = rng.integers(0, token_limit or special.mask, seq_len - 1).tolist()
        rows.append(pack_samples([layout_gmask(tokens, (seq_len - 1) // 2, special, use_2d=use_2d)], seq_len,
                                 special.pad))
    return {c: np.array([r[c] for r in rows], dtype=np.int64) for c in COLUMNS}


def suite_tokenizer(dry: bool):
    """The sample tokenizer of the suite's parts, trained once per suite run (cached in the
    directory $GPU_SUITE_CACHE that the suite gives its parts)."""
    from eval_speed import sample_tokenizer
    from glm.tokenizer import GLMTokenizer

    cache = os.environ.get("GPU_SUITE_CACHE")
    path = Path(cache) / f"tokenizer_{'dry' if dry else 'full'}.model" if cache else None
    if path and path.exists():
        return GLMTokenizer(path.read_bytes())
    tokenizer = sample_tokenizer(4, 2600, max_chars=1500) if dry else sample_tokenizer()
    if path:
        tmp = path.with_suffix(f".{os.getpid()}")
        tmp.write_bytes(tokenizer.to_bytes())
        os.replace(tmp, path)
    return tokenizer


# Part 1 ------------------------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    """Test files that hold GPU tests (collecting only those keeps the run short and free of
    the Ray / MLflow imports of other test modules)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text(encoding="utf-8"))


class _Outcomes:
    """pytest plugin: counts outcomes as tests finish, into the part's result file (a part
    killed at its time limit keeps the counts so far)."""

    def __init__(self, rec: Recorder):
        self.rec, self.counts, self.failed = rec, {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}, []

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":  # setup/teardown count only when not passed
            key = {"passed": "passed", "skipped": "skipped"}.get(report.outcome,
                                                                 "failed" if report.when == "call" else "errors")
            self.counts[key] += 1
            if key in ("failed", "errors"):
                self.failed.append(report.nodeid)
            self.rec.update(**self.counts, failed_tests=self.failed[:20])


def part_pytest_gpu(ctx: Context) -> None:
    import pytest

    files = gpu_test_files()
    ctx.rec.update(files=files)
    outcomes = _Outcomes(ctx.rec)
    code = pytest.main(["-m", "gpu", "-q", "-p", "no:cacheprovider", *files], plugins=[outcomes])
    c = outcomes.counts
    ok = int(code) in (0, 5) and not c["failed"] and not c["errors"]  # 5: nothing collected
    ctx.rec.update(status="ok" if ok else "failed", exit_code=int(code), tests=sum(c.values()),
                   note=None if ctx.device == "cuda" else "no CUDA here: GPU tests skip")


# Part 2 ------------------------------------------------------------------------------------


def measure_training(preset_name: str, seq_len: int, micro: int, warmup: int, steps: int, device: str,
                     precision: str, compiled: bool, peak_flops: float | None, backend: str = "inductor") -> dict:
    """Tokens/s of the model library's forward/backward and the engine's optimizer (LocalEngine:
    AdamW, LR schedule, clipping) on synthetic [gMASK] rows; the first `warmup` steps untimed."""
    import torch

    from glm.config import preset
    from glm.model import GLMModel
    from stages.engine.config import EngineConfig, OptimConfig
    from stages.engine.local import LocalEngine
    from glm.flops import training_flops_per_token
    from train_throughput import autocast

    config = preset(preset_name, max_seq_len=seq_len)
    _reset_peak(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = GLMModel(config).train()
    engine = LocalEngine(model, EngineConfig(train_steps=warmup + steps, optim=OptimConfig(lr=1e-4, warmup_steps=1)))
    if compiled:
        model.compile(backend=backend)
    rows = synthetic_rows(micro * 2, seq_len, config.vocab_size, _special(config.vocab_size), config.uses_2d_positions, 0)
    batches = [{k: torch.as_tensor(v[i * micro:(i + 1) * micro], device=device) for k, v in rows.items()}
               for i in range(2)]
    t_first, seconds, losses = time.perf_counter(), 0.0, []
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            warm_s, t = time.perf_counter() - t_first, time.perf_counter()
        with autocast(device, precision):
            loss = engine(**batches[step % 2]).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    _sync(device)
    seconds = time.perf_counter() - t
    tokens_per_s = micro * seq_len * steps / seconds
    fpt, hfpt = training_flops_per_token(config, seq_len)  # model FLOPs (MFU), hardware FLOPs (HFU)
    out = {"preset": preset_name, "seq_len": seq_len, "micro_batch": micro, "precision": precision,
           "compiled": compiled, "compile_backend": backend if compiled else None, "parameters": sum(p.numel() for p in model.parameters()),
           "tokens_per_s": round(tokens_per_s, 1), "step_s": round(seconds / steps, 4),
           "warmup_s": round(warm_s, 2), "timed_steps": steps, "flops_per_token": fpt, "hardware_flops_per_token": hfpt,
           "activation_checkpointing": config.activation_checkpointing,
           "final_loss": round(float(losses[-1]), 4), **_peak_memory(device)}
    if peak_flops:
        out["mfu"] = round(tokens_per_s * fpt / peak_flops, 4)
        out["hfu"] = round(tokens_per_s * hfpt / peak_flops, 4)
    del engine, model, batches
    return out


def peak_flops_of_device(args) -> tuple[float | None, str]:
    import torch

    if args.peak_flops:
        return args.peak_flops, "--peak-flops"
    if not torch.cuda.is_available():
        return None, "no GPU: no MFU on CPU"
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16:
        if key in name:
            return peak, f"{name}: bf16 dense peak of {key}"
    return None, f"{name}: unknown peak; pass --peak-flops"


def part_pretrain_mfu(ctx: Context) -> None:
    import torch

    peak, peak_source = peak_flops_of_device(ctx.args)
    if ctx.dry:
        presets, seq, micro, warmup, steps, precision = ["tiny"], 64, 2, 1, 2, "fp32"
    else:
        presets, seq, micro, warmup, steps, precision = ["glm_350m", "glm_1b"], 2048, 8, 3, 6, "bf16"
    # The dry run traces with TorchDynamo only (backend "eager"): Inductor's C++ build on CPU takes minutes.
    backend = "eager" if ctx.dry else "inductor"
    ctx.rec.update(peak_flops=peak, peak_source=peak_source, goal={"mfu": 0.45}, compile_backend=backend,
                   attention=os.environ.get("GLM_ATTENTION_IMPL", "auto (sdpa with the schema's boolean mask)"))
    runs = []
    for compiled in (False, True):
        for name in presets:
            if compiled and ctx.left() < (15 if ctx.dry else 50):
                runs.append({"preset": name, "compiled": True, "skipped": f"{ctx.left():.0f} s left in the part"})
                continue
            log(f"[pretrain_mfu] {name}, {micro} x {seq}, {precision}, "
                f"{f'torch.compile ({backend})' if compiled else 'eager'} ...")
            try:
                r = measure_training(name, seq, micro, warmup, steps, ctx.device, precision, compiled, peak, backend)
            except torch.cuda.OutOfMemoryError as e:
                r = {"preset": name, "compiled": compiled, "error": f"out of memory: {str(e)[:200]}"}
            except Exception as e:  # a compile failure must not lose the eager figures
                if not compiled:
                    raise
                r = {"preset": name, "compiled": True, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"  {r}")
            runs.append(r)
            ctx.rec.update(runs=runs, **_best_training(runs, presets))  # kept if a later compile runs over
            if ctx.device == "cuda":
                torch.cuda.empty_cache()
    ctx.rec.update(status="ok")


def _best_training(runs: list[dict], presets: list[str]) -> dict:
    """Per preset the faster of eager and compiled (and which it is)."""
    best = {}
    for name in presets:
        done = [r for r in runs if r["preset"] == name and "tokens_per_s" in r]
        if done:
            b = max(done, key=lambda r: r["tokens_per_s"])
            eager = next((r for r in done if not r["compiled"]), None)
            best[name] = {k: b.get(k) for k in ("tokens_per_s", "mfu", "hfu", "peak_memory_gib", "compiled", "seq_len",
                                                "precision")}
            best[name]["compile_speedup"] = (round(b["tokens_per_s"] / eager["tokens_per_s"], 3)
                                            if eager and b is not eager else None)
    return {"best": best, "used": {n: ("torch.compile" if b["compiled"] else "eager") for n, b in best.items()}}


# Part 3 ------------------------------------------------------------------------------------


def decode_tokens_per_s(model, special, vocab_limit: int, new_tokens: int, prompt_len: int, device: str) -> float:
    """Greedy decoding of exactly new_tokens tokens for one prompt with glm.generation (KV cache)."""
    import torch

    from glm.generation import GenerationConfig, SpanQuery, generate_spans

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_limit, (prompt_len,), generator=g).tolist() + [special.gmask]
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    query = [SpanQuery(prompt, len(prompt) - 1, True)]
    generate_spans(model, query, special, GenerationConfig(max_new_tokens=4, min_new_tokens=4), vocab_limit)  # warm-up
    _sync(device)
    t = time.perf_counter()
    out = generate_spans(model, query, special, config, vocab_limit)
    _sync(device)
    assert len(out[0]) == new_tokens, f"generated {len(out[0])} tokens, expected {new_tokens}"
    return new_tokens / (time.perf_counter() - t)


def build_random_model(preset_name: str, device: str, dtype, **overrides):
    """A preset with random (DeepNorm-initialised) weights, built directly on the device."""
    import torch

    from glm.config import preset
    from glm.model import GLMModel

    torch.manual_seed(0)
    with torch.device(device):
        model = GLMModel(preset(preset_name, **overrides))
    return model.to(dtype).eval()


def part_quant_kernels(ctx: Context) -> None:
    import copy

    import torch

    from glm.quantization import QuantSpec, cast_model, linear_weight_bytes, quantize_model
    from int4_kernel import copy_bandwidth, host_bench, layer_shapes, time_case

    if ctx.dry:
        shapes = [("tiny", "query_key_value", 64, 192), ("tiny", "dense_4h_to_h", 256, 64)]
        batches, bench, reps = [1, 16], host_bench, 20
        bandwidth = copy_bandwidth(torch, host_bench, "cpu", 2**24)
        decode_preset, dtype, new_tokens = "tiny", torch.float32, 8
    else:
        from triton.testing import do_bench

        shapes = [(p, *s) for p in ("chatglm_6b", "glm_130b") for s in layer_shapes(p)]
        batches, bench, reps = [1, 16, 64], do_bench, 25
        bandwidth = copy_bandwidth(torch, do_bench)
        decode_preset, dtype, new_tokens = "chatglm_6b", torch.float16, 64
    log(f"[quant_kernels] copy bandwidth {bandwidth / 1e9:.1f} GB/s ({ctx.device}"
        f"{', Triton interpreter' if os.environ.get('TRITON_INTERPRET') == '1' else ''})")
    ctx.rec.update(copy_GBps=round(bandwidth / 1e9, 2), goal={"speedup_b1": 3.0, "speedup_b16": 2.5,
                                                              "bandwidth_fraction": 0.75},
                   triton_interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    cases = []
    for model_name, layer, K, N in shapes:
        for bits in (4, 8):
            for M in batches:
                case = time_case(torch, bench, K, N, M, bits, 0, reps, bandwidth, ctx.device,
                                 baselines=("float16", "bfloat16"), tolerance=5e-3)
                case.update(model=model_name, layer=layer)
                cases.append(case)
                log(f"  {model_name} {layer} {K}x{N} W{bits}A16 batch {M:>2}: fp16 {case['float16_ms']:.4f} ms, "
                    f"bf16 {case['bfloat16_ms']:.4f} ms, int{bits} {case[f'int{bits}_ms']:.4f} ms, "
                    f"{case['speedup']:.2f}x, {case['bandwidth_fraction']:.0%} of copy bandwidth")
                ctx.rec.update(cases=cases, kernels=_worst_cases(cases))  # the summary so far survives a kill
            if ctx.device == "cuda":
                torch.cuda.empty_cache()
    ctx.rec.update(kernels=_worst_cases(cases), kernel_shapes_done=len(shapes),
                   baseline="fp16 torch.matmul (bf16 beside it)")

    log(f"[quant_kernels] decoding {new_tokens} tokens, batch 1, {decode_preset} with random weights ...")
    model = build_random_model(decode_preset, ctx.device, dtype)
    special, vocab = _special(model.config.vocab_size), model.config.vocab_size - 8
    decode = {}
    for name, bits in (("fp16" if dtype == torch.float16 else "fp32", None), ("int8", 8), ("int4", 4)):
        m = model if bits is None else cast_model(quantize_model(copy.deepcopy(model), QuantSpec(bits, 0)), dtype)
        tps = decode_tokens_per_s(m, special, vocab, new_tokens, 32, ctx.device)
        decode[name] = {"tokens_per_s": round(tps, 1), "linear_weight_gib": round(linear_weight_bytes(m) / 2**30, 3)}
        log(f"  {name}: {tps:.1f} tokens/s")
        if m is not model:
            del m
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
        ctx.rec.update(decode={"preset": decode_preset, "new_tokens": new_tokens, **decode})
    base = next(iter(decode.values()))["tokens_per_s"]
    for name in ("int8", "int4"):
        decode[name]["speedup"] = round(decode[name]["tokens_per_s"] / base, 3)
    ctx.rec.update(status="ok", decode={"preset": decode_preset, "new_tokens": new_tokens, **decode})


def _worst_cases(cases: list[dict]) -> dict:
    """Per bit width, the smallest speed-up and bandwidth fraction over the layers at each batch."""
    def worst(bits: int, M: int, key: str):
        values = [c[key] for c in cases if c["bits"] == bits and c["M"] == M]
        return min(values) if values else None

    return {f"w{bits}a16": {"speedup_b1": worst(bits, 1, "speedup"), "speedup_b16": worst(bits, 16, "speedup"),
                            "speedup_b64": worst(bits, 64, "speedup"),
                            "bandwidth_fraction_b1": worst(bits, 1, "bandwidth_fraction")} for bits in (4, 8)}


# Part 4 ------------------------------------------------------------------------------------


def _queries(tokenizer, prompts: list[str]):
    """Completion queries as the serve API builds them (stages.serve.protocol.generation_query,
    which needs pydantic): the prompt + [gMASK]."""
    from glm.generation import SpanQuery

    out = []
    for p in prompts:
        ids = tokenizer.encode(p) + [tokenizer.special.gmask]
        out.append(SpanQuery(ids, len(ids) - 1, True))
    return out


def part_serve_engine(ctx: Context) -> None:
    import torch

    from serve_load import PROMPTS, decode_load

    tokenizer = suite_tokenizer(ctx.dry)
    if ctx.dry:
        preset_name, dtype, max_tokens, levels = "tiny", torch.float32, 8, {1: 2, 8: 8, 32: 32}
    else:
        preset_name, dtype, max_tokens, levels = "chatglm_6b", torch.float16, 64, {1: 4, 8: 16, 32: 64}
    from glm.config import padded_vocab_size, preset

    vocab = max(preset(preset_name).vocab_size, padded_vocab_size(len(tokenizer)))
    model = build_random_model(preset_name, ctx.device, dtype, vocab_size=vocab)
    queries = _queries(tokenizer, PROMPTS)
    ctx.rec.update(preset=preset_name, dtype=str(dtype).replace("torch.", ""), max_tokens=max_tokens, goal=6.0)
    results = {}
    for concurrency, n in levels.items():
        log(f"[serve_engine] {preset_name}: {n} requests of {max_tokens} tokens, concurrency {concurrency} ...")
        r = decode_load(model, tokenizer, queries, n, concurrency, max_tokens)
        results[f"c{concurrency}"] = r
        log(f"  {r}")
        ctx.rec.update(levels=results)
    c1, c32 = results["c1"]["tokens_per_s"], results["c32"]["tokens_per_s"]
    ctx.rec.update(status="ok", levels=results, ratio_c32_over_c1=round(c32 / c1, 3),
                   ratio_c8_over_c1=round(results["c8"]["tokens_per_s"] / c1, 3))


# Part 5 ------------------------------------------------------------------------------------


def part_batched_eval(ctx: Context) -> None:
    import torch

    from eval_speed import build_model, measure

    if ctx.dry:
        preset_name, dtype, items, batch, repeats = "tiny", torch.float32, 16, 8, 1
    else:
        preset_name, dtype, items, batch, repeats = "chatglm_6b", torch.float16, 64, 16, 2
    model, tokenizer = build_model(None, ctx.device, preset_name, dtype, tokenizer=suite_tokenizer(ctx.dry))
    ctx.rec.update(preset=preset_name)
    r = measure(model, tokenizer, items, batch, repeats, log)
    ctx.rec.update(status="ok", **r)


# Part 6 ------------------------------------------------------------------------------------


def part_ppo_iteration(ctx: Context) -> None:
    import ppo_throughput as ppo

    if ctx.dry:
        preset_name, prompts, new_tokens, prompt_len = "tiny", 4, 8, 32
    else:
        preset_name, prompts, new_tokens, prompt_len = "glm_350m", 8, 32, 64
    s = ppo.setup(preset_name, prompts, 2, new_tokens, prompt_len, ctx.device, log=log,
                  tokenizer=suite_tokenizer(ctx.dry))
    ctx.rec.update(preset=preset_name, prompts=prompts, new_tokens=new_tokens,
                   parameters_per_model=s["parameters_per_model"], precision="fp32", goal={"rollout_speedup": 3.0})
    log(f"[ppo_iteration] {preset_name}: {prompts} prompts x {new_tokens} new tokens on {ctx.device} ...")
    ctx.rec.update(**ppo.run_iterations(s, 2, log))
    ctx.rec.update(status="ok", **ppo.rollout_comparison(s, log))


# Part 7 ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_attempt(spec_file: str) -> None:
    """One run of the engine in this process (a subprocess of part 7): fit_in_process."""
    import torch

    from glm.config import preset
    from stages.engine import EngineConfig, OptimConfig, TrainSpec, fit_in_process, lm_loss_step
    from stages.pretrain.stage import build_model

    s = json.load(open(spec_file))
    torch.use_deterministic_algorithms(True, warn_only=True)
    # ...without filling every torch.empty with NaN: DeepSpeed allocates 2 GB gradient buckets
    # with it at every micro-step (half a minute of memset on a small CPU run)
    torch.utils.deterministic.fill_uninitialized_memory = False
    if not torch.cuda.is_available():  # (the engine skips DeepSpeed's CPU shm all-reduce build itself)
        torch.set_num_threads(1)  # tiny shapes: more threads only contend
    config = preset(s["preset"], vocab_size=s["vocab_size"], max_seq_len=s["seq_len"], hidden_dropout=0.0,
                    **s.get("overrides", {}))
    spec = TrainSpec(model_factory=functools.partial(build_model, config), data_uri=s["data"], step_fn=lm_loss_step)
    cfg = EngineConfig(run_name=s["run_name"], storage_path=s["storage"], num_workers=1,
                       micro_batch_size=s["micro_batch"], train_steps=s["steps"], zero_stage=2,
                       precision=s["precision"], checkpoint_every=s["checkpoint_every"], log_every=s["steps"],
                       optim=OptimConfig(lr=1e-3, warmup_steps=2), fail_at_steps=s["fail_at_steps"], fail_rank=0)
    fit_in_process(spec, cfg)
    # Everything is on disk (checkpoints, step log). Exit now: on CPU this process was seen to
    # hang in interpreter shutdown after fit_in_process returned (gloo / DeepSpeed teardown).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def part_engine_in_process(ctx: Context) -> None:
    try:
        import deepspeed  # noqa: F401  (only here: the rest of the suite runs without it)
    except Exception as e:  # ImportError, or a broken install
        ctx.rec.update(status="skipped", reason=f"deepspeed cannot be imported: {type(e).__name__}: {e}"[:300])
        return
    import stages.engine

    if not hasattr(stages.engine, "fit_in_process"):  # engine_attempt runs it
        ctx.rec.update(status="skipped", reason="engine in-process API not on this branch")
        return
    import numpy as np

    from glm.config import padded_vocab_size
    from glm.schema import COLUMNS
    from stages.engine.config import EngineConfig
    from stages.engine.trainer import events, final_steps, step_log
    from stages.sft.data import write_prepared

    cuda = ctx.device == "cuda"
    if ctx.dry:
        preset_name, overrides, seq, micro, steps, every, kill = "tiny", {}, 32, 2, 6, 3, 5
    else:  # glm_350m's width, 6 layers (~80M parameters): checkpoints of ~1 GB keep the part short
        preset_name, overrides, seq, micro, steps, every, kill = "glm_350m", {"num_layers": 6}, 1024, 4, 8, 4, 6
    # the killed run dies before step kill + 1, after a checkpoint at step kill // every * every:
    # the steps in between run twice (before the kill, after the resume) and must match
    precision = "bf16" if cuda else "fp32"
    tokenizer = suite_tokenizer(ctx.dry)
    vocab = padded_vocab_size(len(tokenizer))
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_engine_", dir=os.environ.get("GPU_SUITE_CACHE")))
    rows = synthetic_rows(micro * steps + 8, seq, vocab, tokenizer.special, False, 1, token_limit=len(tokenizer))
    as_dicts = [{c: rows[c][i].tolist() for c in COLUMNS} for i in range(len(rows["input_ids"]))]
    data = str(work / "data")
    write_prepared(data, {"train": (as_dicts[:-8], len(as_dicts) - 8), "validation": (as_dicts[-8:], 8)}, tokenizer,
                   {"schema": {"columns": list(COLUMNS), "seq_len": seq, "position_encoding": "rope_1d"}})
    base = {"preset": preset_name, "overrides": overrides, "vocab_size": vocab, "seq_len": seq, "micro_batch": micro, "steps": steps,
            "checkpoint_every": every, "precision": precision, "data": data, "storage": str(work / "runs")}
    ctx.rec.update(preset=preset_name, overrides=overrides, seq_len=seq, micro_batch=micro, steps=steps, checkpoint_every=every,
                   kill_at_step=kill, zero_stage=2, precision=precision, deepspeed=deepspeed.__version__)

    children: list[subprocess.Popen] = []

    def launch(run_name: str, fail: list[int]) -> tuple[subprocess.Popen, float]:
        spec_file = work / f"{run_name}-{time.time_ns()}.json"
        spec_file.write_text(json.dumps({**base, "run_name": run_name, "fail_at_steps": fail}))
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(_free_port()), "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
               "GLM_ATTENTION_IMPL": "reference"}  # the deterministic attention path
        proc = subprocess.Popen([sys.executable, __file__, "--engine-attempt", str(spec_file)], cwd=REPO, env=env,
                                start_new_session=True)
        children.append(proc)
        return proc, time.perf_counter()

    def finish(started: tuple[subprocess.Popen, float]) -> tuple[int, float]:
        proc, t = started
        try:
            code = proc.wait(timeout=max(5.0, ctx.left() - 2))
        except subprocess.TimeoutExpired:
            for child in children:  # with any compiler they started
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
            raise
        return code, time.perf_counter() - t

    def cfg(run_name: str) -> EngineConfig:
        return EngineConfig(run_name=run_name, storage_path=base["storage"])

    # On the GPU the runs go one after the other (the uninterrupted one is also timed); in the
    # dry run the uninterrupted run goes beside the killed one and its resume (CPU time is short).
    log(f"[engine_in_process] {preset_name}, ZeRO-2 {precision}, {steps} steps of {micro} x {seq}: an uninterrupted "
        f"run{' beside' if ctx.dry else ', then'} a run killed at step {kill + 1} and resumed ...")
    clean_run = launch("clean", [])
    if not ctx.dry:
        code, clean_s = finish(clean_run)
        if code != 0:
            raise RuntimeError(f"the uninterrupted run exited with {code}")
    code, killed_s = finish(launch("faulty", [kill]))
    log(f"  the killed run exited with {code} after {killed_s:.1f} s; resuming ...")
    ctx.rec.update(killed_exit_code=code, killed_s=round(killed_s, 2))
    code, resumed_s = finish(launch("faulty", [kill]))
    if code != 0:
        raise RuntimeError(f"the resumed run exited with {code}")
    if ctx.dry:
        code, clean_s = finish(clean_run)
        if code != 0:
            raise RuntimeError(f"the uninterrupted run exited with {code}")
    clean = final_steps(cfg("clean"))
    ctx.rec.update(uninterrupted_s=round(clean_s, 2), losses=[clean[s]["loss"] for s in sorted(clean)])
    faulty = final_steps(cfg("faulty"))
    starts = [e for e in events(cfg("faulty")) if e.get("event") == "start"]
    identical = sorted(faulty) == sorted(clean) and all(faulty[s]["loss"] == clean[s]["loss"] for s in clean)
    first = {r["step"]: r["loss"] for r in step_log(cfg("faulty")) if r["attempt"] == 0}
    replayed = {s: faulty[s]["loss"] for s in first if faulty[s]["attempt"] > 0}  # run before the kill and again
    replayed_ok = bool(replayed) and all(first[s] == v for s, v in replayed.items())
    steady = [r for s, r in sorted(clean.items()) if s > 2]
    tokens_per_s = sum(r["tokens"] for r in steady) / max(1e-9, sum(r["seconds"] for r in steady)) if steady else None
    ctx.rec.update(status="ok" if identical and replayed_ok else "failed", losses_identical=identical,
                   resumed_from_step=starts[-1]["step"] if len(starts) > 1 else None,
                   resumed_from=starts[-1].get("resumed_from") if len(starts) > 1 else None,
                   max_abs_loss_diff=float(np.max([abs(faulty[s]["loss"] - clean[s]["loss"]) for s in clean if s in faulty])),
                   resumed_s=round(resumed_s, 2), attempts=len(starts), replayed_steps=sorted(replayed),
                   replayed_steps_identical=replayed_ok, tokens_per_s=round(tokens_per_s, 1) if tokens_per_s else None)
    log(f"  resumed run {resumed_s:.1f} s; losses identical: {identical}")


PART_FUNCTIONS = {
    "pytest_gpu": part_pytest_gpu, "pretrain_mfu": part_pretrain_mfu, "quant_kernels": part_quant_kernels,
    "serve_engine": part_serve_engine, "batched_eval": part_batched_eval, "ppo_iteration": part_ppo_iteration,
    "engine_in_process": part_engine_in_process,
}


def third_party_modules() -> list[str]:
    """Top-level modules loaded in this process that are neither the standard library nor this repo's."""
    local = {"glm", "kernels", "stages", "tests", "conftest"} | {p.stem for p in BENCH.glob("*.py")}
    names = {k.split(".")[0] for k, v in list(sys.modules.items()) if v is not None}
    return sorted(n for n in names - set(sys.stdlib_module_names) - local if not n.startswith(("_", "test_")))


def run_part(args) -> int:
    rec = Recorder(args.result)
    try:
        import torch

        torch.manual_seed(0)
        ctx = Context(dry=args.dry_run, device=_torch_device(), deadline=args.deadline, rec=rec, args=args)
        if ctx.dry and ctx.device != "cpu":
            ctx.device = "cpu"
        if ctx.dry:
            torch.set_num_threads(1)  # tiny shapes: threads only contend (the CI machine is shared)
        rec.update(device=ctx.device)
        PART_FUNCTIONS[args.run_part](ctx)
        if rec.data.get("status") == "running":
            rec.update(status="ok")
        rec.update(third_party_modules=third_party_modules())
        return 0
    except BaseException as e:  # noqa: BLE001  (the parent reads the reason from the result file)
        traceback.print_exc()
        rec.update(status="error", error=f"{type(e).__name__}: {e}"[:1000])
        return 1


# --- the parent side: the whole suite --------------------------------------------------------


def environment() -> dict:
    env = {"python": sys.version.split()[0], "platform": sys.platform, "cpus": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["device"] = torch.cuda.get_device_name(0)
            env["device_memory_gib"] = round(p.total_memory / 2**30, 1)
            env["device_count"] = torch.cuda.device_count()
        else:
            env["device"] = "cpu"
    except Exception as e:  # noqa: BLE001
        env["torch"] = f"unavailable: {e}"
    import importlib.util

    for name in ("triton", "deepspeed", "ray", "mlflow"):
        try:
            env[f"{name}_importable"] = importlib.util.find_spec(name) is not None and name not in _blocked()
        except (ValueError, ImportError):
            env[f"{name}_importable"] = False
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _blocked() -> set[str]:
    return {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}


def goals(parts: dict) -> list[dict]:
    """Each goal of the issue with its figure, the baseline from the same run and the ratio."""
    out = []

    def add(name, value, baseline, ratio, goal, part):
        out.append({"goal": name, "value": value, "baseline": baseline, "ratio": ratio, "target": goal,
                    "met": None if ratio is None else ratio >= goal, "part": part})

    mfu = parts.get("pretrain_mfu", {}).get("best", {})
    for name, b in mfu.items():
        add(f"MFU {name} (seq {b.get('seq_len')}, {b.get('precision')}, {'compiled' if b.get('compiled') else 'eager'})",
            b.get("tokens_per_s"),
            "peak bf16 FLOP/s", b.get("mfu"), 0.45, 2)
    k = parts.get("quant_kernels", {})
    w4 = k.get("kernels", {}).get("w4a16", {})
    for key, goal in (("speedup_b1", 3.0), ("speedup_b16", 2.5), ("bandwidth_fraction_b1", 0.75)):
        add(f"W4A16 {key} (worst layer)", None, "fp16 torch.matmul" if "speedup" in key else "device copy bandwidth",
            w4.get(key), goal, 3)
    s = parts.get("serve_engine", {})
    levels = s.get("levels", {})
    if "c32" in levels and "c1" in levels:
        c1, c32 = levels["c1"]["tokens_per_s"], levels["c32"]["tokens_per_s"]
        add("serve tokens/s at concurrency 32 over 1", c32, c1, round(c32 / c1, 3) if c1 else None, 6.0, 4)
    e = parts.get("batched_eval", {})
    if "ratio" in e:
        add("batched multiple-choice eval over one item at a time", e["items_per_s"], e["baseline_items_per_s"],
            e["ratio"], 3.0, 5)
    p = parts.get("ppo_iteration", {})
    if "rollout_speedup" in p:
        add("PPO rollout with KV cache and batching over neither", p["rollout_tokens_per_s"],
            p["baseline_rollout_tokens_per_s"], p["rollout_speedup"], 3.0, 6)
    return out


class Suite:
    def __init__(self, args, parts: list[Part] | None = None):
        self.args = args
        self.all_parts = parts or PARTS
        self.selected: list[str] = []
        self.dry = args.dry_run
        self.budget = args.budget_s or (DRY_BUDGET_S if self.dry else DEFAULT_BUDGET_S)
        self.start = time.time()
        self.deadline = self.start + self.budget
        self.parts: dict[str, dict] = {}
        self.proc: subprocess.Popen | None = None
        self.interrupted = False
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.start))
        self.outs = [Path(args.out) if args.out else REPO / "runs" / "gpu_suite" / f"{stamp}{'-dry' if self.dry else ''}.json"]
        if os.environ.get("OUT"):
            self.outs.append(Path(os.environ["OUT"]) / ("gpu_suite_dry.json" if self.dry else "gpu_suite.json"))
        self.log_file = None
        if os.environ.get("OUT"):
            Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
            self.log_file = open(Path(os.environ["OUT"]) / ("gpu_suite_dry.log" if self.dry else "gpu_suite.log"), "a")
        self.env = environment()
        self.cache = tempfile.mkdtemp(prefix="gpu_suite_cache_")  # shared by the parts (the tokenizer)

    def say(self, line: str) -> None:
        print(line, flush=True)
        if self.log_file:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def result(self) -> dict:
        selected = [p for p in self.all_parts if p.name in self.selected]
        parts = [{"part": p.number, "name": p.name, "what": p.what, **self.parts.get(p.name, {"status": "not run"})}
                 for p in selected]
        return {"suite": "gpu_suite", "dry_run": self.dry, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime(self.start)),
                "wall_s": round(time.time() - self.start, 1), "budget_s": self.budget,
                "interrupted": self.interrupted, "environment": self.env,
                "blocked_imports": sorted(_blocked()),
                "statuses": {p["name"]: p["status"] for p in parts}, "parts": parts,
                "goals": goals(self.parts),
                "note": ("dry run: tiny shapes on CPU, the figures only prove the code runs; they are not "
                         "comparable with the goals") if self.dry else None}

    def write(self) -> dict:
        result = self.result()
        for out in self.outs:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(result, indent=1))
                os.replace(tmp, out)
            except OSError as e:
                self.say(f"[suite] could not write {out}: {e}")
        return result

    def _pump(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self.say(line.rstrip("\n"))

    def run_one(self, part: Part) -> None:
        left = self.deadline - time.time()
        limit = min((part.dry_limit_s if self.dry else part.limit_s) * self.args.part_limit_scale, left)
        if limit < 5:
            self.parts[part.name] = {"status": "skipped", "reason": f"suite budget spent ({left:.0f} s left)"}
            return
        self.say(f"[suite] part {part.number}/{len(self.all_parts)} {part.name}: {part.what} (limit {limit:.0f} s, "
                 f"{left:.0f} s of the budget left)")
        fd, result_file = tempfile.mkstemp(prefix=f"gpu_suite_{part.name}_", suffix=".json")
        os.close(fd)
        Path(result_file).write_text(json.dumps({"status": "started"}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "PYTHONUNBUFFERED": "1", "GPU_SUITE_CACHE": self.cache}
        if self.dry and part.name == "quant_kernels":
            env["TRITON_INTERPRET"] = "1"  # the Triton kernel runs in Triton's CPU interpreter
        cmd = self.part_command(part, result_file, time.time() + limit)
        t = time.time()
        status, code, pump, interrupted = None, None, None, False
        try:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, errors="replace", start_new_session=True)
            pump = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
            pump.start()
            try:
                code = self.proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                self._kill()
                status = "timeout"
        except KeyboardInterrupt:  # SIGINT / SIGTERM: keep this part's figures, then stop
            self._kill()
            status, interrupted = "interrupted", True
        if pump is not None and pump.ident is not None:  # started (an interrupt can come before)
            pump.join(timeout=5)
        self.proc = None
        try:
            data = json.loads(Path(result_file).read_text())
        except (OSError, ValueError):
            data = {}
        with contextlib.suppress(OSError):
            os.unlink(result_file)
        if status is None:
            status = data.get("status", "error")
            if code != 0 and status in ("ok", "running", "started"):
                status = "error"
            if status in ("running", "started"):
                status = "error"
        data.update(status=status, seconds=round(time.time() - t, 1), limit_s=round(limit, 1))
        if code not in (0, None):
            data["exit_code"] = code
        self.parts[part.name] = data
        self.say(f"[suite] part {part.number} {part.name}: {status} in {data['seconds']} s")
        if interrupted:
            raise KeyboardInterrupt

    def part_command(self, part: Part, result_file: str, deadline: float) -> list[str]:
        """The child process of a part: this script with --run-part."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-part", part.name, "--result", result_file,
               "--deadline", str(deadline)]
        if self.dry:
            cmd.append("--dry-run")
        if self.args.peak_flops:
            cmd += ["--peak-flops", str(self.args.peak_flops)]
        return cmd

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def _on_signal(self, signum, frame) -> None:
        self.interrupted = True
        self._kill()
        raise KeyboardInterrupt

    def run(self) -> int:
        self.selected = [p.name for p in self.all_parts if not self.args.parts or str(p.number) in self.args.parts
                         or p.name in self.args.parts]
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _run(self) -> int:
        self.say(f"[suite] {'dry run (tiny shapes, CPU)' if self.dry else 'GPU run'}: parts {self.selected}, "
                 f"budget {self.budget:.0f} s, device {self.env.get('device')}, torch {self.env.get('torch')}")
        try:
            for part in self.all_parts:
                if part.name in self.selected:
                    self.run_one(part)
                    self.write()
        except KeyboardInterrupt:
            self.interrupted = True
            self.say("[suite] interrupted: writing what was measured")
        result = self.write()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.say(f"[suite] {result['statuses']} in {result['wall_s']} s; JSON in {', '.join(map(str, self.outs))}")
        print(json.dumps(result), flush=True)
        if self.log_file:
            self.log_file.write(json.dumps(result) + "\n")
            self.log_file.close()
        bad = [s for s in result["statuses"].values() if s not in ("ok", "skipped")]
        return 130 if self.interrupted else (1 if bad else 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (CI): proves every part runs")
    parser.add_argument("--parts", nargs="+", metavar="PART",
                        help="run only these parts (numbers or names, e.g. --parts 2 quant_kernels)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"overall wall-clock budget (default {DEFAULT_BUDGET_S:.0f} s, dry run {DRY_BUDGET_S:.0f} s); "
                             "each part also has its own limit")
    parser.add_argument("--part-limit-scale", type=float, default=1.0,
                        help="multiply every part's own time limit (e.g. 3 on a heavily shared CPU machine)")
    parser.add_argument("--out", help="JSON result file (default runs/gpu_suite/<UTC time>.json; also $OUT/gpu_suite.json)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak bf16 FLOP/s of the device for MFU (default: from the device name, H100/H200 989.4e12)")
    parser.add_argument("--run-part", choices=list(PART_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--engine-attempt", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.engine_attempt:
        return engine_attempt(args.engine_attempt)
    if args.run_part:
        return run_part(args)
    return Suite(args).run()


if __name__ == "__main__":
    sys.exit(main())
