"""Running a pipeline: the stages in order, each skipped when its complete output for the same
config hash exists, evaluations after the stages that make models, then the registry entry and
the endpoint check."""

from __future__ import annotations

import time

from glm.config import ConfigError
from pipelines import effects
from pipelines.config import PipelineConfig
from pipelines.endpoint import check
from pipelines.jobs import place_job_outputs
from pipelines.markers import Markers, fingerprint
from pipelines.runs import describe, key_runs
from pipelines.tracking import PipelineRun
from pipelines.wiring import STAGES, eval_config, final_model, stage_config
from stages import storage
from stages.tracking import default_tracking_uri


def selected_stages(p: PipelineConfig, only: str | None, start: str | None) -> list[str]:
    """The stages `--only` / `--from` select (all of them by default)."""
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

    selected = selected_stages(p, only, start)
    place_job_outputs(p)  # a Ray job's outputs and MLflow store must outlive its working directory
    p.work_dir = storage.absolute(p.work_dir.replace("{name}", p.name))
    # stages log from other processes (Ray tasks, train workers): one store for all, decided here
    p.tracking.tracking_uri = p.tracking.tracking_uri or default_tracking_uri()
    markers = Markers(p.work_dir)
    ensure_ray(4)
    tracker = PipelineRun(p)
    outputs: dict[str, dict[str, str]] = {}
    scores: dict[str, dict[str, float]] = {}  # model URI -> its evaluation's metrics
    t_start = time.time()
    upstream = ""  # hash chain: a stage's hash covers every stage before it
    try:
        for name in p.stages:
            cfg = stage_config(p, name, outputs)
            if STAGES[name].deploys:
                if name in selected:
                    print(f"== {name}", flush=True)
                    t0 = time.time()
                    outputs[name] = STAGES[name].run(cfg, p)
                    tracker.stage_done(name, outputs[name], time.time() - t0)
                continue
            runs = key_runs(name, cfg, upstream)  # engine runs named by their config hash
            if name == "data":  # the input files too (size, modification time): a changed corpus rebuilds
                from stages.data.corpus import inputs_fingerprint

                upstream += inputs_fingerprint(cfg)["fingerprint"]
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
                for r in runs:
                    print(f"   {describe(r)}", flush=True)
                tracker.stage_runs(name, {r.label: r.engine.run_name for r in runs})
                t0 = time.time()
                STAGES[name].run(cfg, p)
                outputs[name] = {k: storage.absolute(v) for k, v in STAGES[name].outputs(cfg).items()}
                markers.write(name, config_hash, outputs[name], time.time() - t0,
                              runs={r.label: r.engine.run_name for r in runs})
                tracker.stage_done(name, outputs[name], time.time() - t0)
                print(f"== {name} done in {time.time() - t0:.0f}s: {outputs[name]}", flush=True)
            if name in p.eval_after:
                scores[outputs[name]["model"]] = evaluate(p, name, outputs[name]["model"], config_hash, markers, tracker)
        final = final_model(p, outputs)
        if final and selected[-1] == p.stages[-1]:
            effects.summary(outputs)  # what each stage did, measured (pipelines/effects.py)
            answers = check(p, outputs, final)
            tracker.log_check(answers)
            if p.check.require_sensible:  # before registration: a model that answers noise is never registered
                effects.check_answers(answers, effects.tokenizer_of(final))
            tracker.register(final, scores.get(final), outputs.get("data", {}).get("data", ""))
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


def evaluate(p: PipelineConfig, after: str, model: str, model_hash: str, markers: Markers,
             tracker: PipelineRun) -> dict[str, float]:
    """Evaluate a stage's model (skipped when its report for the same config and model exists);
    returns the report's metrics."""
    from pipelines.placement import run_eval

    cfg = eval_config(p, after, model)
    name, config_hash = f"eval-{after}", fingerprint(cfg, model_hash)
    if (done := markers.finished(name, config_hash)) is not None:
        print(f"== {name}: report for config {config_hash} exists ({done['outputs']['report']}): skipped", flush=True)
        tracker.stage_skipped(name, done)
        return _report_metrics(done["outputs"]["report"])
    print(f"== {name} (config {config_hash})", flush=True)
    t0 = time.time()
    report = run_eval(cfg)  # a Ray task with its config's device
    outputs = {"report": report["report_uri"], "table": report["table_uri"]}  # the time in their names filled in
    markers.write(name, config_hash, outputs, time.time() - t0)
    tracker.stage_done(name, outputs, time.time() - t0)
    headline = {k: round(v, 4) for k, v in report["metrics"].items() if not k.endswith(("/items", "_stderr"))}
    print(f"== {name} done in {time.time() - t0:.0f}s: {headline} (table: {report['table_uri']})", flush=True)
    return report["metrics"]


def _report_metrics(uri: str) -> dict[str, float]:
    """The metrics of an evaluation report written earlier ({} when it is gone)."""
    import json

    fs, path = storage.resolve(uri)
    try:
        return json.loads(storage.read_bytes(fs, path)).get("metrics", {})
    except FileNotFoundError:
        return {}
