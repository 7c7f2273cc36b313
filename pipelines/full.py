"""The whole recipe as one pipeline: data -> pretrain -> sft -> rlhf -> quantize -> serve,
with evaluation after each training stage and after quantization.

    python -m pipelines.full --config pipelines/configs/smoke.yaml            (one machine)
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python pipelines/full.py --config pipelines/configs/chatglm_6b.yaml   (a Ray cluster)

Each stage gets the URIs of the previous stages' outputs. A stage whose complete output for
the same config exists is skipped (a finished pipeline rerun does nothing and says so); a
training stage interrupted by a crash continues from its last checkpoint when the pipeline
is rerun with the same name. `--only STAGE` runs one stage (its inputs must exist), `--from
STAGE` starts there. MLflow: one parent run per pipeline run, a nested run per stage, the
final model registered in the Model Registry (a version per run, alias `newest`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import posixpath
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `python pipelines/full.py` (ray job submit puts the repo root on sys.path)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm.config import ConfigError, from_dict, load_yaml  # noqa: E402
from pipelines import effects  # noqa: E402
from stages import storage  # noqa: E402
from stages.tracking import TrackingConfig, default_tracking_uri  # noqa: E402

ORDER = ("data", "pretrain", "sft", "rlhf", "quantize", "serve")
MARKERS = "pipeline"


@dataclass
class RegistryConfig:
    """MLflow Model Registry entry for the pipeline's final model."""

    name: str = "glm-chat"
    """Registered model name ("" = do not register)."""
    alias: str = "newest"
    """Alias moved to each new version."""


@dataclass
class CheckConfig:
    """Requests sent to the deployed endpoint at the end of the pipeline."""

    chat: str = "你好"
    fill: str = "话说天下大势，[MASK]"
    max_tokens: int = 24
    require_sensible: bool = True
    """Fail the pipeline when an answer is empty, one token repeated or not in its prompt's
    language (pipelines/effects.py); off only for untrained test models."""


@dataclass
class PipelineConfig:
    """A pipeline run: which stages, their configs, where outputs go, how it is tracked."""

    name: str = "glm"
    """Pipeline name: stage run names and checkpoints derive from it, so rerunning the same
    name skips finished stages and resumes an interrupted one (`--run-name` / GLM_RUN_NAME override it)."""
    work_dir: str = "runs/{name}"
    """Root path or URI of every stage output not set explicitly; `{name}` is replaced by the
    pipeline name, so runs of one config under different names keep separate outputs."""
    stages: list[str] = field(default_factory=lambda: ["data", "pretrain", "sft"])
    """Stages to run, in pipeline order (data, pretrain, sft, rlhf, quantize, serve)."""
    data: dict[str, Any] = field(default_factory=dict)
    """stages.data DataConfig fields (output defaults to <work_dir>/data)."""
    pretrain: dict[str, Any] = field(default_factory=dict)
    """stages.pretrain PretrainConfig fields (data, output, engine run name and storage are filled in)."""
    sft: dict[str, Any] = field(default_factory=dict)
    """stages.sft SFTConfig fields (base, output, engine run name and storage are filled in)."""
    rlhf: dict[str, Any] = field(default_factory=dict)
    """`reward` and `policy`: stages.rlhf RLHFConfig fields of the reward model (optional) and of
    the PPO or DPO policy (bases, outputs, reward model, run names are filled in)."""
    quantize: dict[str, Any] = field(default_factory=dict)
    """stages.quantize QuantizeConfig fields (checkpoint = the last training stage's model)."""
    eval: dict[str, Any] = field(default_factory=dict)
    """stages.eval EvalConfig fields (tasks, max_items, batch_size ...) for every evaluation."""
    eval_after: list[str] = field(default_factory=lambda: ["pretrain", "sft", "rlhf", "quantize"])
    """Evaluate the model of each of these stages (when it runs in this pipeline) right after it."""
    serve: dict[str, Any] = field(default_factory=dict)
    """stages.serve ServeConfig fields (checkpoint = the pipeline's final model; host 0.0.0.0 on a cluster)."""
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(enabled=True))
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    check: CheckConfig = field(default_factory=CheckConfig)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"pipeline stages {unknown} are not available; choose from {list(STAGES)}")
        order = [s for s in ORDER if s in self.stages]
        if order != self.stages:
            raise ConfigError(f"pipeline stages must be in pipeline order {order}, got {self.stages}")
        unknown = [s for s in self.eval_after if s not in ("pretrain", "sft", "rlhf", "quantize")]
        if unknown:
            raise ConfigError(f"eval_after: {unknown} produce no model to evaluate; choose from pretrain, sft, rlhf, quantize")


# --- stages ---------------------------------------------------------------------------------


@dataclass
class Stage:
    """How the pipeline runs one stage: its typed config, how inputs are wired, what it outputs."""

    name: str
    config_class: Callable[[], type]
    wire: Callable[[dict, dict, PipelineConfig], None]
    """(stage config dict, outputs of earlier stages, pipeline) -> fills inputs and defaults."""
    run: Callable[[Any], Any]
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
        if policy.get("mode", "ppo") == "ppo":
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
    cfg["checkpoint"] = cfg.get("checkpoint") or _final_model(p, outputs) or ""
    if not cfg["checkpoint"]:
        raise RuntimeError("serve needs a model: run a training stage (or quantize) before it, or set serve.checkpoint")


def _need(outputs: dict, stage: str, key: str, consumer: str) -> str:
    if stage not in outputs:
        raise RuntimeError(f"{consumer} needs the output of the {stage} stage, which has not run: "
                           f"run the pipeline from {stage} (or set {consumer}'s input in the config)")
    return outputs[stage][key]


def _run_data(cfg) -> None:
    from stages.data.stage import run

    run(cfg)


def _run_pretrain(cfg) -> None:
    from stages.pretrain.stage import run

    run(cfg)


def _run_sft(cfg) -> None:
    from stages.sft.stage import run

    run(cfg)


def _run_rlhf(cfg) -> None:
    from stages.rlhf.stage import run

    if cfg.reward is not None:
        run(cfg.reward)
    run(cfg.policy)


def _run_quantize(cfg) -> None:
    from stages.quantize.stage import run

    run(cfg)


def _run_serve(cfg) -> dict[str, str]:
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


# --- running ------------------------------------------------------------------------------


def eval_config(p: PipelineConfig, after: str, model: str, where: str = "pipeline"):
    """The evaluation of stage `after`'s model: report under <work_dir>/eval/, MLflow run eval-<stage>."""
    from stages.eval.config import EvalConfig

    raw = {**copy.deepcopy(p.eval), "checkpoint": model, "run_name": f"eval-{after}"}
    raw.setdefault("output", posixpath.join(p.work_dir, "eval", f"{after}.json"))
    raw["tracking"] = {**asdict(p.tracking), **raw.get("tracking", {})}
    return from_dict(EvalConfig, raw, f"{where}: eval")


def stage_config(p: PipelineConfig, name: str, outputs: dict, where: str = "pipeline"):
    """The typed config of stage `name` with its inputs wired and the pipeline's tracking."""
    stage = STAGES[name]
    raw = copy.deepcopy(getattr(p, name))
    stage.wire(raw, outputs, p)
    if "tracking" in {f.name for f in dataclasses.fields(stage.config_class())}:
        raw["tracking"] = {**asdict(p.tracking), **raw.get("tracking", {})}
    return from_dict(stage.config_class(), raw, f"{where}: {name}")


def fingerprint(cfg, upstream: str = "") -> str:
    """Hash of a stage config and of the stages before it (`upstream`: the previous stage's
    hash), so a change anywhere reruns everything after it; tracking excluded (where a stage
    logs does not change what it makes)."""
    d = asdict(cfg)
    d.pop("tracking", None)
    return hashlib.sha256(json.dumps([d, upstream], sort_keys=True, default=str).encode()).hexdigest()[:16]


class Markers:
    """<work_dir>/pipeline/<stage>.json: written when a stage finished, with its config hash and outputs."""

    def __init__(self, work_dir: str):
        self.fs, self.root = storage.resolve(posixpath.join(work_dir, MARKERS))

    def finished(self, stage: str, config_hash: str) -> dict | None:
        path = posixpath.join(self.root, f"{stage}.json")
        if not storage.exists(self.fs, path):
            return None
        marker = json.loads(storage.read_bytes(self.fs, path))
        if marker.get("config_hash") != config_hash:
            return None
        fs_paths = [storage.resolve(uri) for uri in marker["outputs"].values()]
        return marker if all(storage.exists(fs, path) for fs, path in fs_paths) else None

    def write(self, stage: str, config_hash: str, outputs: dict, seconds: float) -> None:
        record = {"stage": stage, "config_hash": config_hash, "outputs": outputs, "seconds": seconds,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        storage.write_bytes(self.fs, posixpath.join(self.root, f"{stage}.json"), json.dumps(record, indent=2).encode())


def _selected(p: PipelineConfig, only: str | None, start: str | None) -> list[str]:
    for flag, value in (("--only", only), ("--from", start)):
        if value and value not in p.stages:
            raise ConfigError(f"{flag} {value}: not one of this pipeline's stages {p.stages}")
    if only:
        return [only]
    if start:
        return p.stages[p.stages.index(start):]
    return list(p.stages)


def run(p: PipelineConfig, only: str | None = None, start: str | None = None) -> dict[str, dict[str, str]]:
    """Run the selected stages; returns every stage's outputs (earlier ones from their markers)."""
    from stages.cluster import ensure_ray

    selected = _selected(p, only, start)
    p.work_dir = storage.absolute(p.work_dir.replace("{name}", p.name))
    markers = Markers(p.work_dir)
    ensure_ray(4)
    tracker = _PipelineRun(p)
    outputs: dict[str, dict[str, str]] = {}
    t_start = time.time()
    upstream = ""  # hash chain: a stage's hash covers every stage before it
    try:
        for name in p.stages:
            cfg = stage_config(p, name, outputs)
            if STAGES[name].deploys:
                if name in selected:
                    print(f"== {name}", flush=True)
                    t0 = time.time()
                    outputs[name] = STAGES[name].run(cfg)
                    tracker.stage_done(name, outputs[name], time.time() - t0)
                continue
            config_hash = upstream = fingerprint(cfg, upstream)
            done = markers.finished(name, config_hash)
            if name not in selected:
                # an earlier stage outside the selection: later stages take its (existing) outputs
                outputs[name] = done["outputs"] if done else \
                    {k: storage.absolute(v) for k, v in STAGES[name].outputs(cfg).items()}
                continue
            if done is not None:
                print(f"== {name}: complete output for config {config_hash} exists "
                      f"({', '.join(done['outputs'].values())}): skipped", flush=True)
                outputs[name] = done["outputs"]
                tracker.stage_skipped(name, done)
            else:
                print(f"== {name} (config {config_hash})", flush=True)
                t0 = time.time()
                STAGES[name].run(cfg)
                outputs[name] = {k: storage.absolute(v) for k, v in STAGES[name].outputs(cfg).items()}
                markers.write(name, config_hash, outputs[name], time.time() - t0)
                tracker.stage_done(name, outputs[name], time.time() - t0)
                print(f"== {name} done in {time.time() - t0:.0f}s: {outputs[name]}", flush=True)
            if name in p.eval_after:
                _evaluate(p, name, outputs[name]["model"], config_hash, markers, tracker)
        final = _final_model(p, outputs)
        if final and selected[-1] == p.stages[-1]:
            tracker.register(final)
            effects.summary(outputs)  # what each stage did, measured (pipelines/effects.py)
            answers = check(p, outputs, final)
            tracker.log_check(answers)
            if p.check.require_sensible:
                effects.check_answers(answers, effects.tokenizer_of(final))  # fails on noise
            if "serve" in outputs:
                print(f"endpoint: {outputs['serve']['url']} (lives as long as this Ray cluster)", flush=True)
        tracker.finish("FINISHED")
    except BaseException:
        tracker.finish("FAILED")
        raise
    ran = [s for s in selected if s in outputs]
    print(f"pipeline {p.name}: {len(ran)} stage(s) in {time.time() - t_start:.0f}s; outputs under {p.work_dir}",
          flush=True)
    if p.tracking.enabled:
        print(f"MLflow: .venv/bin/mlflow ui --backend-store-uri {p.tracking.tracking_uri or default_tracking_uri()}",
              flush=True)
    return outputs


def _evaluate(p: PipelineConfig, after: str, model: str, model_hash: str, markers: "Markers",
              tracker: "_PipelineRun") -> None:
    """Evaluate a stage's model (skipped when its report for the same config and model exists)."""
    from stages.eval.stage import run as run_eval

    cfg = eval_config(p, after, model)
    name, config_hash = f"eval-{after}", fingerprint(cfg, model_hash)
    if (done := markers.finished(name, config_hash)) is not None:
        print(f"== {name}: report for config {config_hash} exists ({done['outputs']['report']}): skipped", flush=True)
        tracker.stage_skipped(name, done)
        return
    print(f"== {name} (config {config_hash})", flush=True)
    t0 = time.time()
    report = run_eval(cfg)
    outputs = {"report": storage.absolute(cfg.output)}
    markers.write(name, config_hash, outputs, time.time() - t0)
    tracker.stage_done(name, outputs, time.time() - t0)
    headline = {k: round(v, 4) for k, v in report["metrics"].items() if not k.endswith("/items")}
    print(f"== {name} done in {time.time() - t0:.0f}s: {headline}", flush=True)


def check(p: PipelineConfig, outputs: dict, model_uri: str) -> dict[str, str]:
    """A chat turn and a blank filling with the final model: through the deployed endpoint when
    the pipeline serves it, else in this process. Returns {request: answer}."""
    c = p.check
    if "serve" in outputs:
        url = outputs["serve"]["url"]
        print(f"== requests to the endpoint {url}", flush=True)
        chat_body = {"model": p.serve.get("model_name", "glm"), "messages": [{"role": "user", "content": c.chat}],
                     "max_tokens": c.max_tokens, **effects.check_decoding()}
        fill_body = {"text": c.fill, "max_tokens": c.max_tokens, **effects.check_decoding()}
        key = p.serve.get("api_key", "")
        answers = {f"chat: {c.chat}": _post(f"{url}/v1/chat/completions", chat_body, key)["choices"][0]["message"]["content"],
                   f"fill: {c.fill}": _post(f"{url}/v1/glm/fill", fill_body, key)["text"]}
    else:
        from glm.checkpoint import load_inference_checkpoint
        from glm.generation import chat, chat_generation_config, fill_blanks

        model, tokenizer = load_inference_checkpoint(model_uri)
        gen = chat_generation_config(c.max_tokens, seed=effects.CHECK_SEED)
        response, _ = chat(model, tokenizer, c.chat, config=gen)
        [filled] = fill_blanks(model, tokenizer, [c.fill], gen)
        answers = {f"chat: {c.chat}": response, f"fill: {c.fill}": filled.text}
    for request, answer in answers.items():
        print(f"  {request!r} -> {answer!r}", flush=True)
    return answers


def _post(url: str, body: dict, api_key: str = "") -> dict:
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def _final_model(p: PipelineConfig, outputs: dict) -> str | None:
    for name in reversed(p.stages):
        if "model" in outputs.get(name, {}):
            return outputs[name]["model"]
    return None


class _PipelineRun:
    """The parent MLflow run of one pipeline run; stages open nested runs under it."""

    def __init__(self, p: PipelineConfig):
        self.p, self.mlflow, self.run = p, None, None
        if not p.tracking.enabled:
            return
        import mlflow

        mlflow.set_tracking_uri(p.tracking.tracking_uri or default_tracking_uri())
        mlflow.set_experiment(p.tracking.experiment)
        self.run = mlflow.start_run(run_name=p.name, tags={"pipeline": p.name, "work_dir": p.work_dir})
        mlflow.log_params({"stages": ",".join(p.stages), "work_dir": p.work_dir})
        mlflow.log_dict(asdict(p), "pipeline_config.json")
        self.mlflow = mlflow

    def stage_done(self, stage: str, outputs: dict, seconds: float) -> None:
        if self.mlflow:
            self.mlflow.log_metric(f"{stage}.seconds", seconds)
            self.mlflow.set_tags({f"{stage}.{k}": v for k, v in outputs.items()})

    def stage_skipped(self, stage: str, marker: dict) -> None:
        if self.mlflow:
            self.mlflow.set_tags({f"{stage}.skipped": "complete output reused",
                                  **{f"{stage}.{k}": v for k, v in marker["outputs"].items()}})

    def register(self, model_uri: str) -> None:
        """Register the final checkpoint by reference (no copy of the weights): a new version
        per pipeline run, the alias moved to it."""
        if not (self.mlflow and self.p.registry.name):
            return
        client = self.mlflow.MlflowClient()
        name = self.p.registry.name
        try:
            client.get_registered_model(name)
        except self.mlflow.exceptions.MlflowException:
            client.create_registered_model(name, description="GLM chat model trained by pipelines/full.py")
        version = client.create_model_version(name, source=model_uri, run_id=self.run.info.run_id,
                                              tags={"pipeline": self.p.name})
        client.set_registered_model_alias(name, self.p.registry.alias, version.version)
        self.mlflow.set_tag("registered_model", f"models:/{name}/{version.version}")
        print(f"registered {model_uri} as models:/{name}/{version.version} (alias @{self.p.registry.alias})",
              flush=True)

    def log_check(self, answers: dict[str, str]) -> None:
        if self.mlflow:
            self.mlflow.log_dict(answers, "check_requests.json")

    def finish(self, status: str) -> None:
        if self.mlflow and self.mlflow.active_run():
            self.mlflow.end_run(status=status)


def load_config(path: str, run_name: str | None = None) -> PipelineConfig:
    """The pipeline config, every stage section validated against its typed config."""
    p = load_yaml(PipelineConfig, path)
    p.name = run_name or p.name
    p.work_dir = p.work_dir.replace("{name}", p.name)
    outputs: dict[str, dict[str, str]] = {}
    for name in p.stages:  # fail before anything runs on a bad key in any stage section
        outputs[name] = STAGES[name].outputs(stage_config(p, name, outputs, where=path))
        if name in p.eval_after:
            eval_config(p, name, outputs[name]["model"], where=path)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipelines/full.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML (pipelines/configs/*.yaml)")
    parser.add_argument("--only", choices=ORDER, help="run only this stage (its inputs must exist)")
    parser.add_argument("--from", dest="start", choices=ORDER, help="start at this stage (earlier outputs must exist)")
    parser.add_argument("--run-name", default=os.environ.get("GLM_RUN_NAME"),
                        help="pipeline name override (default: the config's `name`, or $GLM_RUN_NAME); "
                             "the same name skips finished stages and resumes an interrupted one")
    args = parser.parse_args(argv)
    try:
        p = load_config(args.config, args.run_name)
        run(p, only=args.only, start=args.start)
    except (ConfigError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
