"""The stage registry: for each stage its typed config, how its inputs are wired from earlier
outputs and the pipeline's defaults, how it runs and what it outputs. A new stage is added here
(and to `pipelines.config.ORDER`)."""

from __future__ import annotations

import copy
import dataclasses
import posixpath
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from glm.config import build_with_overrides, from_dict, read_yaml
from pipelines.config import ORDER, PipelineConfig


@dataclass
class Stage:
    """How the pipeline runs one stage: its typed config, how inputs are wired, what it outputs."""

    name: str
    config_class: Callable[[], type]
    wire: Callable[[dict, dict, PipelineConfig], None]
    """(stage config dict, outputs of earlier stages, pipeline) -> fills inputs and defaults."""
    run: Callable[[Any, PipelineConfig], Any]
    """(typed config, pipeline) -> None, or the outputs of a deployment."""
    outputs: Callable[[Any], dict[str, str]]
    """Output URIs of a finished stage (name -> URI); `model` is the checkpoint later stages take."""
    deploys: bool = False
    """A deployment, not an output: always (re)deployed, never skipped; `run` returns its outputs."""


def _engine_defaults(cfg: dict, p: PipelineConfig, stage: str) -> None:
    engine = cfg.setdefault("engine", {})
    engine.setdefault("run_name", f"{p.name}-{stage}")
    engine.setdefault("storage_path", posixpath.join(p.work_dir, "ray"))


def _wire_data(cfg: dict, outputs: dict, p: PipelineConfig) -> None:
    cfg.setdefault("output", posixpath.join(p.work_dir, "data"))


def _wire_pretrain(cfg: dict, outputs: dict, p: PipelineConfig) -> None:
    cfg["data"] = cfg.get("data") or _need(outputs, "data", "data", "pretrain")
    cfg.setdefault("output", posixpath.join(p.work_dir, "pretrain", "model"))
    _engine_defaults(cfg, p, "pretrain")


def _wire_sft(cfg: dict, outputs: dict, p: PipelineConfig) -> None:
    cfg["base"] = cfg.get("base") or _need(outputs, "pretrain", "model", "sft")
    cfg.setdefault("output", posixpath.join(p.work_dir, "sft", "model"))
    _engine_defaults(cfg, p, "sft")


def _wire_rlhf(cfg: dict, outputs: dict, p: PipelineConfig) -> None:
    base = outputs["sft"]["model"] if "sft" in outputs else _need(outputs, "pretrain", "model", "rlhf")
    tracking = asdict(p.tracking)
    policy = cfg.setdefault("policy", {})
    if "reward" in cfg:
        reward = cfg["reward"]
        reward.setdefault("mode", "reward")
        reward["base"] = reward.get("base") or base
        reward.setdefault("output", posixpath.join(p.work_dir, "rlhf", "reward_model"))
        _engine_defaults(reward, p, "reward")
        reward["tracking"] = {**tracking, **reward.get("tracking", {})}
        if policy.get("mode", "ppo") in ("ppo", "grpo", "rloo"):
            policy["reward_model"] = policy.get("reward_model") or reward["output"]
    policy.setdefault("mode", "ppo")
    policy["base"] = policy.get("base") or base
    policy.setdefault("output", posixpath.join(p.work_dir, "rlhf", "model"))
    _engine_defaults(policy, p, policy["mode"])
    policy["tracking"] = {**tracking, **policy.get("tracking", {})}


def _wire_quantize(cfg: dict, outputs: dict, p: PipelineConfig) -> None:
    trained = [s for s in ("rlhf", "sft", "pretrain") if s in outputs]
    if not cfg.get("checkpoint") and not trained:
        raise RuntimeError("quantize needs a trained model: run pretrain (or sft, rlhf) before it")
    cfg["checkpoint"] = cfg.get("checkpoint") or outputs[trained[0]]["model"]
    cfg.setdefault("output", posixpath.join(p.work_dir, "quantize", "model"))


def _wire_serve(cfg: dict, outputs: dict, p: PipelineConfig) -> None:
    cfg["checkpoint"] = cfg.get("checkpoint") or final_model(p, outputs) or ""
    if not cfg["checkpoint"]:
        raise RuntimeError("serve needs a model: run a training stage (or quantize) before it, or set serve.checkpoint")


def _need(outputs: dict, stage: str, key: str, consumer: str) -> str:
    if stage not in outputs:
        raise RuntimeError(f"{consumer} needs the output of the {stage} stage, which has not run: "
                           f"run the pipeline from {stage} (or set {consumer}'s input in the config)")
    return outputs[stage][key]


def _run_data(cfg, p: PipelineConfig) -> None:
    from stages.data.stage import run

    run(cfg)


def _run_pretrain(cfg, p: PipelineConfig) -> None:
    from stages.pretrain.stage import run

    run(cfg)


def _run_sft(cfg, p: PipelineConfig) -> None:
    from stages.sft.stage import run

    run(cfg)


def _run_rlhf(cfg, p: PipelineConfig) -> None:
    from stages.rlhf.stage import run

    if cfg.reward is not None:
        run(cfg.reward)
    run(cfg.policy)


def _run_quantize(cfg, p: PipelineConfig) -> None:
    from pipelines.placement import run_quantize

    run_quantize(cfg, num_cpus=p.resources.quantize_cpus)  # a Ray task with its config's device


def _run_serve(cfg, p: PipelineConfig) -> dict[str, str]:
    from stages.serve import deploy

    url = deploy(cfg)
    print(f"endpoint: {url}  (OpenAI-compatible: {url}/v1, web chat: {url}/)", flush=True)
    return {"url": url}


def _config_class(module: str, name: str) -> Callable[[], type]:
    def load() -> type:
        import importlib

        return getattr(importlib.import_module(module), name)

    return load


STAGES: dict[str, Stage] = {
    "data": Stage("data", _config_class("stages.data.config", "DataConfig"), _wire_data, _run_data,
                  lambda c: {"data": c.output}),
    "pretrain": Stage("pretrain", _config_class("stages.pretrain.config", "PretrainConfig"), _wire_pretrain,
                      _run_pretrain, lambda c: {"model": c.output}),
    "sft": Stage("sft", _config_class("stages.sft.config", "SFTConfig"), _wire_sft, _run_sft,
                 lambda c: {"model": c.output, "data": c.data.output or f"{c.output}_data"}),
    "rlhf": Stage("rlhf", _config_class("stages.rlhf.config", "RLHFChainConfig"), _wire_rlhf, _run_rlhf,
                  lambda c: {"model": c.policy.output, **({"reward_model": c.reward.output} if c.reward else {})}),
    "quantize": Stage("quantize", _config_class("stages.quantize.config", "QuantizeConfig"), _wire_quantize,
                      _run_quantize, lambda c: {"model": c.output}),
    "serve": Stage("serve", _config_class("stages.serve.config", "ServeConfig"), _wire_serve, _run_serve,
                   lambda c: {}, deploys=True),
}
assert tuple(STAGES) == ORDER


def stage_config(p: PipelineConfig, name: str, outputs: dict, where: str = "pipeline"):
    """The typed config of stage `name` with its inputs wired and the pipeline's tracking."""
    stage = STAGES[name]
    raw = copy.deepcopy(getattr(p, name))
    stage.wire(raw, outputs, p)
    if "tracking" in {f.name for f in dataclasses.fields(stage.config_class())}:
        raw["tracking"] = {**asdict(p.tracking), **raw.get("tracking", {})}
    return from_dict(stage.config_class(), raw, f"{where}: {name}")


def eval_config(p: PipelineConfig, after: str, model: str, where: str = "pipeline"):
    """The evaluation of stage `after`'s model: a report of its own per run under <work_dir>/eval/
    (<stage>-<UTC time>.json, the time filled in when it runs), MLflow run eval-<stage>."""
    from stages.eval.config import EvalConfig

    raw = {**copy.deepcopy(p.eval), "checkpoint": model, "run_name": f"eval-{after}"}
    raw.setdefault("output", posixpath.join(p.work_dir, "eval", f"{after}-{{time}}.json"))
    raw["tracking"] = {**asdict(p.tracking), **raw.get("tracking", {})}
    return from_dict(EvalConfig, raw, f"{where}: eval")


def final_model(p: PipelineConfig, outputs: dict) -> str | None:
    """The model of the last stage that made one (quantize, else the last training stage)."""
    for name in reversed(p.stages):
        if "model" in outputs.get(name, {}):
            return outputs[name]["model"]
    return None


def load_config(path: str, run_name: str | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """The pipeline config, every stage section validated against its typed config. `overrides`
    (`--set path.to.key=value`) change the YAML's data before it is checked, exactly as an edit of
    the file would: same validation, same stage config hashes."""
    return build_with_overrides(lambda data: _validated(data, path, run_name), read_yaml(path), overrides)


def _validated(data: dict, path: str, run_name: str | None) -> PipelineConfig:
    p = from_dict(PipelineConfig, data, where=path)
    p.name = run_name or p.name
    p.work_dir = p.work_dir.replace("{name}", p.name)
    outputs: dict[str, dict[str, str]] = {}
    for name in p.stages:  # fail before anything runs on a bad key in any stage section
        outputs[name] = STAGES[name].outputs(stage_config(p, name, outputs, where=path))
        if name in p.eval_after:
            eval_config(p, name, outputs[name]["model"], where=path)
    return p
