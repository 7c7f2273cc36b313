"""The quantize stage: stream-convert a checkpoint to INT8 / INT4, gate it on perplexity, publish it.

1. `glm.quantization.quantize_checkpoint` converts the input tensor by tensor into a local
   staging directory (never the whole full-precision model twice in memory).
2. The gate measures perplexity on held-out text for the original model, INT8 and INT4 (the
   configured group size) in the same run: the written checkpoint itself is loaded and scored
   for the configured bits, the other width is quantized in memory from the original.
3. If the output's relative increase passes `gate.max_ppl_increase`, the stage raises
   `QualityGateError` and nothing is written to `output`; otherwise the checkpoint (with the
   measurements in its metadata) is moved into place.

Everything is logged to MLflow: params, perplexities and their increases, weight bytes,
a generation sample and the report.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from glm.checkpoint import load_inference_checkpoint, publish_checkpoint, read_checkpoint_quantization
from glm.generation import GenerationConfig, fill_blanks
from glm.quantization import QuantSpec, cast_model, quantize_checkpoint, quantize_model
from stages import storage
from stages.effects import log_effect_metrics, write_effects
from stages.quantize.config import QuantizeConfig
from stages.quantize.quality import heldout_windows, perplexity
from stages.tracking import stage_run


class QualityGateError(RuntimeError):
    """The quantized model's perplexity rose more than the configured limit."""


def _log(msg: str) -> None:
    print(msg, flush=True)


def _device(cfg: QuantizeConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("quantize config: device is 'cuda' but CUDA is not available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _eval_model(uri: str, device: torch.device):
    """Load a checkpoint for scoring: fp16 activations on CUDA (the W4A16 kernel), fp32 on CPU."""
    model, tokenizer = load_inference_checkpoint(uri, device=device)
    return (cast_model(model, torch.float16) if device.type == "cuda" else model), tokenizer


def measure(cfg: QuantizeConfig, staged: str, spec: QuantSpec, device: torch.device) -> dict[str, Any]:
    """Perplexities of the original, INT8 and INT4 models, and a greedy sample of the output."""
    other = QuantSpec(8) if spec.bits == 4 else QuantSpec(4, cfg.group_size)
    model, tokenizer = _eval_model(cfg.checkpoint, device)
    window = min(cfg.gate.window, model.config.max_seq_len - 1)
    windows = heldout_windows(cfg.gate.text, tokenizer, cfg.gate.max_tokens, window)
    n_tokens = sum(len(w) for w in windows)
    _log(f"[quantize] gate text: {len(windows)} windows, {n_tokens} tokens from {cfg.gate.text}")

    def score(label: str, m) -> None:
        start = time.perf_counter()
        ppl[label] = perplexity(m, windows, tokenizer, cfg.gate.batch_size)
        _log(f"[quantize] perplexity {label}: {ppl[label]:.4f} ({time.perf_counter() - start:.1f}s)")

    ppl: dict[str, float] = {}
    score("fp", model)
    score(f"int{other.bits}", quantize_model(model, other))  # in place: the original is scored already
    del model
    quantized = _eval_model(staged, device)[0]  # the checkpoint as written
    score(f"int{spec.bits}", quantized)
    gen = GenerationConfig(max_new_tokens=cfg.sample_max_new_tokens)
    filled = fill_blanks(quantized, tokenizer, cfg.sample_prompts, gen)
    samples = {prompt: result.text for prompt, result in zip(cfg.sample_prompts, filled)}
    for prompt, text in samples.items():
        _log(f"[quantize] sample {prompt!r} -> {text!r}")
    return {"perplexity": ppl, "gate_tokens": n_tokens, "samples": samples}


def run(cfg: QuantizeConfig) -> dict[str, Any]:
    """Quantize `cfg.checkpoint` into `cfg.output`; returns the report (raises QualityGateError)."""
    if not cfg.checkpoint:
        raise ValueError("quantize config: `checkpoint` (the full-precision inference checkpoint) is not set")
    cfg.checkpoint, cfg.output = storage.checkpoint(cfg.checkpoint), storage.absolute(cfg.output)
    if read_checkpoint_quantization(cfg.checkpoint) is not None:
        raise ValueError(f"{cfg.checkpoint} is already quantized: give the full-precision checkpoint")
    if cfg.gate.enabled:
        storage.expand(cfg.gate.text)  # fail before converting when the gate's text is missing
    spec = QuantSpec(cfg.bits, cfg.group_size)
    device = _device(cfg)
    with stage_run(cfg.tracking.enabled, "quantize", asdict(cfg), cfg.tracking.experiment,
                   cfg.tracking.tracking_uri) as tracking, tempfile.TemporaryDirectory() as tmp:
        staged = str(Path(tmp) / "model")
        start = time.perf_counter()
        report: dict[str, Any] = {"source": cfg.checkpoint, "output": cfg.output, "quantization": spec.to_dict()}
        report["weights"] = quantize_checkpoint(cfg.checkpoint, staged, spec, progress=_log,
                                                metadata={"stage": "quantize", "source": cfg.checkpoint})
        report["convert_seconds"] = time.perf_counter() - start
        weights = report["weights"]
        _log(f"[quantize] block linear weights: {weights['linear_bytes_fp16'] / 2**20:.2f} MiB as fp16 -> "
             f"{weights['linear_bytes_quantized'] / 2**20:.2f} MiB as {spec.name} "
             f"({weights['memory_ratio']:.1%})")
        tracking.log_metrics({"linear_bytes_fp16": weights["linear_bytes_fp16"],
                              "linear_bytes_source": weights["linear_bytes_source"],
                              "linear_bytes_quantized": weights["linear_bytes_quantized"],
                              "memory_ratio": weights["memory_ratio"]})
        if cfg.gate.enabled:
            report.update(measure(cfg, staged, spec, device))
            ppl = report["perplexity"]
            increases = {f"ppl_increase_{k}": ppl[k] / ppl["fp"] - 1 for k in ppl if k != "fp"}
            report["ppl_increase"] = increase = increases[f"ppl_increase_int{spec.bits}"]
            report["gate_passed"] = increase <= cfg.gate.max_ppl_increase
            tracking.log_metrics({**{f"ppl_{k}": v for k, v in ppl.items()}, **increases})
            tracking.log_dict(report, "quantize_report.json")
            tracking.set_tags({"gate": "passed" if report["gate_passed"] else "failed"})
            if not report["gate_passed"]:
                raise QualityGateError(
                    f"quality gate failed: {spec.name} perplexity {ppl[f'int{spec.bits}']:.4f} is "
                    f"{increase:+.2%} over the original's {ppl['fp']:.4f}, above the limit "
                    f"gate.max_ppl_increase = {cfg.gate.max_ppl_increase:.2%}; nothing was written to "
                    f"{cfg.output}. Try bits: 8 or a group_size (e.g. 128), or raise the limit."
                )
            _log(f"[quantize] gate passed: {increase:+.2%} <= {cfg.gate.max_ppl_increase:.2%}")
        else:
            tracking.log_dict(report, "quantize_report.json")
        _record_in_metadata(staged, report)
        publish_checkpoint(staged, cfg.output)
        tracking.set_tags({"output": cfg.output})
        if cfg.gate.enabled:  # the stage's effect: what quantization cost on text the model did not train on
            effects = {"stage": "quantize", "gate_text": cfg.gate.text, "gate_tokens": report["gate_tokens"],
                       **{f"ppl_{k}": v for k, v in report["perplexity"].items()},
                       "ppl_increase": report["ppl_increase"], "gate_passed": report["gate_passed"]}
            write_effects(cfg.output, effects)
            log_effect_metrics(effects)
    _log(f"[quantize] {spec.name} checkpoint written to {cfg.output}")
    return report


def _record_in_metadata(staged: str, report: dict[str, Any]) -> None:
    """Keep the measurements with the checkpoint (config.json metadata), for eval and serve."""
    path = Path(staged) / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["metadata"]["quantize_report"] = {k: v for k, v in report.items() if k not in ("samples",)}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")

