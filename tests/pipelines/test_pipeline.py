"""The pipeline driver end to end on tiny settings (real Ray, DeepSpeed, MLflow): stage wiring,
MLflow lineage and registry, skipping finished stages, resuming an interrupted one."""

import json
import socket

import pytest

from conftest import REPO, SAMPLE
from glm.checkpoint import load_inference_checkpoint, read_checkpoint_quantization
from pipelines.full import CheckConfig, PipelineConfig, run
from stages.engine.config import EngineConfig
from stages.engine.trainer import step_log
from stages.tracking import TrackingConfig

pytestmark = pytest.mark.integration


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
    assert {"data", "tiny-pretrain", "tiny-sft", "quantize", "eval-sft", "eval-quantize"} <= children
    [fp, int4] = [next(r for r in runs if r.info.run_name == f"eval-{s}") for s in ("sft", "quantize")]
    assert fp.data.metrics.keys() == int4.data.metrics.keys() and "boolq/accuracy" in fp.data.metrics
    answers = json.load(open(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, tracking_uri=cfg.tracking.tracking_uri,
                                                                 artifact_path="check_requests.json")))
    assert set(answers) == {"chat: 你好", "fill: 话说天下大势，[MASK]"}  # answered by the endpoint
    assert parent.data.tags["sft.model"] == outputs["sft"]["model"]
    version = client.get_model_version_by_alias("glm-chat", "newest")
    assert version.source == outputs["quantize"]["model"] and version.run_id == parent.info.run_id


def test_rerunning_a_finished_pipeline_skips_every_stage(finished, tokenizer, capsys):
    tmp, _, outputs = finished
    before = len(step_log(EngineConfig(run_name="tiny-pretrain", storage_path=str(tmp / "work/ray"))))
    again = run(tiny_pipeline(tmp, tokenizer, port=int(outputs["serve"]["url"].rsplit(":", 1)[1])))
    out = capsys.readouterr().out
    assert out.count(": skipped") == 6, out  # 4 stages and 2 evaluations
    assert again == outputs
    assert len(step_log(EngineConfig(run_name="tiny-pretrain", storage_path=str(tmp / "work/ray")))) == before


def test_a_pipeline_killed_in_pretraining_resumes_from_its_checkpoint(tmp_path, tokenizer, ray_instance):
    crash = tiny_pipeline(tmp_path, tokenizer, name="crash",
                          pretrain_engine={"fail_at_steps": [3], "fail_rank": 0, "max_failures": 0})
    crash.stages = ["data", "pretrain"]
    with pytest.raises(Exception):
        run(crash)  # dies at step 3; the step-2 checkpoint remains
    rerun = tiny_pipeline(tmp_path, tokenizer, name="crash")
    rerun.stages = ["data", "pretrain"]
    run(rerun)
    log = step_log(EngineConfig(run_name="crash-pretrain", storage_path=str(tmp_path / "work/ray")))
    # steps 1-3 before the crash at step 4; the rerun resumes from the step-2 checkpoint and replays step 3
    assert [(r["step"], r["attempt"]) for r in log] == [(1, 0), (2, 0), (3, 0), (3, 1), (4, 1)]
    assert log[2]["loss"] == log[3]["loss"]
