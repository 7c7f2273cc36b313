"""The pipeline driver end to end on tiny settings (real Ray, DeepSpeed, MLflow): stage wiring,
MLflow lineage and registry, skipping finished stages, resuming an interrupted one."""

import json
import socket

import pytest
from ray.train import TrainingFailedError

from conftest import REPO, SAMPLE
from glm.checkpoint import load_inference_checkpoint, read_checkpoint_quantization
from pipelines.full import CheckConfig, PipelineConfig, run
from stages.engine.config import EngineConfig
from stages.engine.trainer import step_log
from stages.tracking import TrackingConfig

pytestmark = pytest.mark.integration


def engine_run(work, stage: str, label: str | None = None) -> EngineConfig:
    """The engine run a finished stage trained in (its name carries the config hash), from its marker."""
    name = json.loads((work / "pipeline" / f"{stage}.json").read_text())["runs"][label or stage]
    return EngineConfig(run_name=name, storage_path=str(work / "ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_pipeline(tmp_path, tokenizer, name="tiny", pretrain_engine=None, port=0) -> PipelineConfig:
    engine = {"num_workers": 2, "micro_batch_size": 2, "zero_stage": 2, "log_every": 1, "seed": 3}
    return PipelineConfig(
        name=name, work_dir=str(tmp_path / "work"), stages=["data", "pretrain", "sft", "quantize", "serve"],
        data={"sources": [{"uri": str(SAMPLE / "pretrain/en_tinyshakespeare.jsonl")}],
              "tokenizer": {"path": str(tokenizer.save(tmp_path))},
              "objective": {"seq_len": 64, "mask_window": 32}, "mip": {"token_share": 0.0}, "num_buckets": 2},
        pretrain={"model": {"preset": "tiny"},
                  "engine": {**engine, "train_steps": 4, "checkpoint_every": 2, **(pretrain_engine or {})}},
        sft={"data": {"sources": [{"uri": str(SAMPLE / "sft/zh_oasst1.jsonl")}], "seq_len": 64, "max_samples": 20},
             "method": {"kind": "lora", "lora_rank": 2},
             "engine": {**engine, "train_steps": 2, "checkpoint_every": 2}, "sample_prompts": ["你好"],
             "max_new_tokens": 4},
        quantize={"bits": 4, "gate": {"max_tokens": 512, "window": 64, "max_ppl_increase": 1.0},
                  "sample_max_new_tokens": 4},
        eval={"tasks": [str(REPO / "stages/eval/tasks/en/boolq.yaml"), str(REPO / "stages/eval/tasks/en/lambada.yaml")],
              "max_items": 4, "parallel": "local"},
        eval_after=["sft", "quantize"],
        serve={"port": port or free_port(), "num_cpus": 0.5},
        tracking=TrackingConfig(enabled=True, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="pipe"),
        check=CheckConfig(max_tokens=4, require_sensible=False),  # an untrained tiny model answers noise
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokenizer, ray_instance):
    from stages.serve import shutdown

    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = tiny_pipeline(tmp, tokenizer)
    yield tmp, cfg, run(cfg)
    shutdown()


def test_stages_are_wired_and_the_endpoint_answers(finished):
    tmp, cfg, outputs = finished
    assert outputs["serve"]["url"] == f"http://127.0.0.1:{cfg.serve['port']}"
    assert outputs["pretrain"]["model"].startswith(str(tmp / "work"))
    meta = json.loads((tmp / "work/sft/model/config.json").read_text())["metadata"]
    assert meta["base"] == outputs["pretrain"]["model"] and meta["method"] == "lora"
    assert read_checkpoint_quantization(outputs["quantize"]["model"]).bits == 4  # quantize took the SFT model
    load_inference_checkpoint(outputs["quantize"]["model"])
    assert json.loads((tmp / "work/pipeline/sft.json").read_text())["outputs"] == outputs["sft"]


def test_mlflow_has_a_parent_run_with_nested_stage_runs_and_a_registered_model(finished):
    import mlflow

    tmp, cfg, outputs = finished
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name("pipe")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.info.run_name == "tiny"]
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    pretrain, sft = (engine_run(tmp / "work", s).run_name for s in ("pretrain", "sft"))
    assert pretrain.startswith("tiny-pretrain-") and sft.startswith("tiny-sft-")  # <pipeline>-<stage>-<config hash>
    # quantize and the evaluations ran as Ray tasks, nested under the pipeline run all the same
    assert {"data", pretrain, sft, "quantize", "eval-sft", "eval-quantize"} <= children
    assert parent.data.tags["pretrain.run.pretrain"] == pretrain
    [fp, int4] = [next(r for r in runs if r.info.run_name == f"eval-{s}") for s in ("sft", "quantize")]
    assert fp.data.metrics.keys() == int4.data.metrics.keys() and "boolq/accuracy" in fp.data.metrics
    answers = json.load(open(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, tracking_uri=cfg.tracking.tracking_uri,
                                                                 artifact_path="check_requests.json")))
    assert set(answers) == {"chat: 你好", "fill: 话说天下大势，[MASK]"}  # answered by the endpoint
    assert parent.data.tags["sft.model"] == outputs["sft"]["model"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    assert exp.artifact_location == (tmp / "mlruns").as_uri()  # beside the database, not in the cwd
    version = client.get_model_version_by_alias("glm-chat", "newest")
    assert version.run_id == parent.info.run_id and version.source.startswith("models:/")  # an MLflow Model
    assert version.tags["checkpoint"] == outputs["quantize"]["model"]
    assert float(version.tags["eval.boolq/accuracy"]) == int4.data.metrics["boolq/accuracy"]
    assert "GLM chat model from pipeline `tiny`" in version.description and "INT4" in version.description
    assert "final.boolq.accuracy" in client.get_run(parent.info.run_id).data.metrics


def test_the_registered_model_answers_from_another_process_and_directory(finished, tmp_path):
    """mlflow.pyfunc.load_model("models:/glm-chat@newest") in a fresh Python elsewhere: the weights
    came with the registry entry; chat requests as a list and as a DataFrame."""
    import os
    import subprocess
    import sys

    tmp, cfg, _ = finished
    script = (
        "import mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/glm-chat@newest')\n"
        "a = m.predict([{'messages': [{'role': 'user', 'content': '你好'}], 'max_tokens': 4}])\n"
        "b = m.predict(pd.DataFrame({'messages': [[{'role': 'user', 'content': 'hi'}]], 'max_tokens': [3]}))\n"
        "assert a[0]['role'] == 'assistant' and isinstance(a[0]['content'], str) and len(b) == 1, (a, b)\n"
        "print('ANSWER', repr(a[0]['content']))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.tracking_uri, "GLM_MODEL_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "ANSWER" in done.stdout, done.stderr[-3000:]

    from glm.checkpoint import load_inference_checkpoint
    from stages.storage import checkpoint

    os.environ["GLM_MODEL_CACHE"] = str(tmp_path / "cache")
    try:
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
        local = checkpoint("models:/glm-chat@newest")  # what stages.serve / eval / quantize / sft open
        assert local.startswith(str(tmp_path / "cache")) and local.endswith("artifacts/model")
        load_inference_checkpoint("models:/glm-chat@newest")
    finally:
        del os.environ["GLM_MODEL_CACHE"]


def test_rerunning_a_finished_pipeline_skips_every_stage(finished, tokenizer, capsys):
    tmp, _, outputs = finished
    before = len(step_log(engine_run(tmp / "work", "pretrain")))
    again = run(tiny_pipeline(tmp, tokenizer, port=int(outputs["serve"]["url"].rsplit(":", 1)[1])))
    out = capsys.readouterr().out
    assert out.count(": skipped") == 6, out  # 4 stages and 2 evaluations
    assert again == outputs
    assert len(step_log(engine_run(tmp / "work", "pretrain"))) == before
    assert "weights unchanged" in out  # the same bytes: no second registry version
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    assert len(client.search_model_versions("name='glm-chat'")) == 1


def test_a_killed_pipeline_resumes_a_changed_config_trains_anew_and_the_same_config_skips(tmp_path, tokenizer,
                                                                                          ray_instance, capsys):
    """One work directory, four runs of data + pretrain: killed at step 3, rerun (the same engine
    run, resumed from its step-2 checkpoint), a changed learning rate (a new engine run from
    step 1, the old one left as it was), the changed config again (skipped)."""
    import mlflow

    def pipeline(**engine) -> PipelineConfig:
        p = tiny_pipeline(tmp_path, tokenizer, name="change", pretrain_engine=engine)
        p.stages, p.eval_after = ["data", "pretrain"], []
        return p

    with pytest.raises(TrainingFailedError):  # the injected worker exit, not a config or Ray start error
        run(pipeline(fail_at_steps=[3], fail_rank=0, max_failures=0))  # dies at step 3; the step-2 checkpoint remains
    run(pipeline())  # fault injection is not part of the config hash: the same engine run, resumed
    first = engine_run(tmp_path / "work", "pretrain")
    first_log = step_log(first)
    # steps 1-3 before the crash at step 4; the rerun resumes from the step-2 checkpoint and replays step 3
    assert [(r["step"], r["attempt"]) for r in first_log] == [(1, 0), (2, 0), (3, 0), (3, 1), (4, 1)]
    assert first_log[2]["loss"] == first_log[3]["loss"]
    capsys.readouterr()

    changed = {"train_steps": 2, "optim": {"lr": 3e-3, "warmup_steps": 1}}
    run(pipeline(**changed))
    out = capsys.readouterr().out
    second = engine_run(tmp_path / "work", "pretrain")
    assert second.run_name != first.run_name and second.run_name.startswith("change-pretrain-")
    assert f"pretrain run {second.run_name} (config " in out and ": fresh run from step 1" in out, out
    assert f"runs of other configs left as they are: {first.run_name}" in out
    log = step_log(second)
    assert [(r["step"], r["attempt"]) for r in log] == [(1, 0), (2, 0)]  # from step 1, not resumed
    assert log[0]["loss"] == first_log[0]["loss"]  # same data and initial weights ...
    assert log[1]["loss"] != first_log[1]["loss"]  # ... trained differently
    assert step_log(first) == first_log  # the old run as it was
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pipe").experiment_id])
    train_runs = {r.info.run_name: r.info.run_id for r in runs if r.info.run_name.startswith("change-pretrain-")}
    assert set(train_runs) == {first.run_name, second.run_name}  # a new MLflow run for the new config

    # the same config again, now with the final check on: the two-step model answers noise, so the
    # pipeline fails before registering it and its MLflow run is marked failed
    versions = len(client.search_model_versions("name='glm-chat'"))
    checked = pipeline(**changed)
    checked.check.require_sensible = True
    with pytest.raises(RuntimeError, match="final check failed, the model's answers are noise"):
        run(checked)
    out = capsys.readouterr().out
    assert "== pretrain: complete output for config" in out and ": skipped" in out, out
    assert step_log(second) == log
    assert len(client.search_model_versions("name='glm-chat'")) == versions  # nothing registered
    [last] = client.search_runs([client.get_experiment_by_name("pipe").experiment_id], "attributes.run_name = 'change'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    assert last.info.status == "FAILED"
