"""The training engine with real Ray Train + DeepSpeed (gloo, 2 CPU workers, tiny model)."""

import functools
from pathlib import Path

import pytest
from ray.train import TrainingFailedError
import torch

from conftest import SAMPLE
from glm.checkpoint import load_inference_checkpoint
from glm.config import ModelSpec
from stages.data.config import CorpusSource, DataConfig, MIPConfig, ObjectiveConfig, TokenizerSettings
from stages.engine import EngineConfig, OptimConfig, TrainSpec, fit, fit_in_process, lm_loss_step
from stages.engine.runtime import TrainingStopped
from stages.engine.trainer import events, final_steps, step_log
from stages.pretrain.config import PretrainConfig
from stages.pretrain.stage import build_model, export_checkpoint, model_config

pytestmark = pytest.mark.integration
STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_instance, tokenizer):
    """A tiny data-stage output (real stage) to train on."""
    from stages.data.stage import run

    tmp = tmp_path_factory.mktemp("engine")
    cfg = DataConfig(sources=[CorpusSource(uri=str(SAMPLE / "pretrain/en_tinyshakespeare.jsonl"))],
                     output=str(tmp / "data"), tokenizer=TokenizerSettings(path=str(tokenizer.save(tmp))),
                     objective=ObjectiveConfig(seq_len=64, mask_window=32), mip=MIPConfig(token_share=0.0),
                     num_buckets=2, validation_fraction=0.05)
    return tmp, run(cfg)


def spec_for(data_uri: str, **kw) -> TrainSpec:
    config = model_config(PretrainConfig(data=data_uri, output="", model=ModelSpec("tiny", {"hidden_dropout": 0.1})))
    return TrainSpec(model_factory=functools.partial(build_model, config), data_uri=data_uri, step_fn=lm_loss_step,
                     grad_norm_params={"embedding_grad_norm": "word_embeddings.weight"}, **kw)


def engine(tmp: Path, name: str, **kw) -> EngineConfig:
    fields = dict(run_name=name, storage_path=str(tmp / "ray"), num_workers=2, micro_batch_size=2, train_steps=STEPS,
                  zero_stage=2, optim=OptimConfig(lr=1e-3, warmup_steps=2), checkpoint_every=2, log_every=1,
                  max_failures=2, seed=7)
    return EngineConfig(**{**fields, **kw})


@pytest.fixture(scope="module", autouse=True)
def fresh_ray_afterwards(ray_instance):
    """The shared Ray instance is restarted after this module. After this module's runs (kills,
    restarts, a TP=2 run, in-process trainings), the next module's first Ray Train run (the
    reward model of tests/stages/rlhf/test_rlhf_stage.py) was seen to wait forever: its
    controller requested resources and never started its workers, with every CPU free. Each
    module alone passes; the cause is not found (see the session notes)."""
    yield
    from conftest import restart_ray

    restart_ray()


@pytest.fixture(scope="module")
def uninterrupted(data):
    tmp, data_uri = data
    cfg = engine(tmp, "clean")
    fit(spec_for(data_uri), cfg)
    return final_steps(cfg)


# Seeded 2-worker run: tiny preset + 10% dropout, ZeRO-2, fp32, lr 1e-3, the tiny data above
# (re-measured when the shipped sample corpus, and so the test tokenizer, changed).
PINNED = [8.035553, 8.022808, 8.010584, 7.999369, 7.981858, 8.011957]  # re-measured: the test tokenizer reserves the chat role tokens


def test_seeded_run_gives_pinned_losses(uninterrupted):
    losses = [uninterrupted[s]["loss"] for s in range(1, STEPS + 1)]
    assert losses == pytest.approx(PINNED, abs=1e-4), losses
    assert losses[-1] < losses[0]


def test_second_driver_resumes_instead_of_restarting(data, uninterrupted):
    tmp, data_uri = data
    first = engine(tmp, "driver", fail_at_steps=[3], fail_rank=0, max_failures=0)
    with pytest.raises(TrainingFailedError):  # the injected worker exit, not a config or Ray start error
        fit(spec_for(data_uri), first)  # the run dies; its step-2 checkpoint remains
    second = engine(tmp, "driver")
    fit(spec_for(data_uri), second)
    log = step_log(second)
    assert [r["step"] for r in log if r["attempt"] == 1][0] == 3  # continued after the step-2 checkpoint
    resumed = final_steps(second)
    assert [resumed[s]["loss"] for s in range(1, STEPS + 1)] == [uninterrupted[s]["loss"] for s in range(1, STEPS + 1)]


def test_zero3_runs_and_a_nonfinite_step_is_skipped_and_counted(data, tmp_path):
    _, data_uri = data
    out = tmp_path / "export"
    cfg = engine(tmp_path, "zero3", zero_stage=3, train_steps=4, checkpoint_every=4, grad_accum_steps=2,
                 batch_warmup_steps=3, batch_warmup_start=1)
    export = functools.partial(export_checkpoint, data_uri=data_uri, output=str(out), metadata={})
    spec = spec_for(data_uri, nonfinite_steps=[1], export_fn=export)
    result = fit(spec, cfg)
    assert result.metrics["skipped_steps"] == 1
    assert 0 < result.metrics["embedding_grad_norm"] < result.metrics["grad_norm"]  # gathered under ZeRO-3
    steps = final_steps(cfg)
    assert [len(steps[s]["indices"]) for s in (1, 2, 3, 4)] == [4, 4, 4, 8]  # batch-size warm-up, 2 workers
    assert [steps[s]["skipped"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]  # one rank's NaN skips the step everywhere
    assert all(steps[s]["loss"] == steps[s]["loss"] for s in (1, 2, 3, 4))  # the other rank's loss is reported
    model, _ = load_inference_checkpoint(out)  # the gathered ZeRO-3 weights were exported whole
    assert all(torch.isfinite(p).all() and p.numel() > 0 for p in model.parameters())

# -- at scale: accumulation, non-finite steps, kills inside checkpoint writes, other worker counts


def accum_engine(tmp: Path, name: str, **kw) -> EngineConfig:
    """2 micro-batches per worker (global batch 8), a NaN micro-batch on one rank at step 2."""
    return engine(tmp, name, global_batch_size=8, check_replicas=True, keep_checkpoints=5, **kw)


def accum_spec(data_uri: str, nonfinite_steps=(1,)) -> TrainSpec:
    config = model_config(PretrainConfig(data=data_uri, output="", model=ModelSpec("tiny", {"hidden_dropout": 0.0})))
    return TrainSpec(model_factory=functools.partial(build_model, config), data_uri=data_uri, step_fn=lm_loss_step,
                     nonfinite_steps=list(nonfinite_steps))


@pytest.fixture(scope="module")
def accumulated(data):
    tmp, data_uri = data
    cfg = accum_engine(tmp, "accum")
    fit(accum_spec(data_uri), cfg)
    return cfg, final_steps(cfg)


def test_nan_in_one_micro_batch_skips_the_step_on_every_rank(accumulated):
    cfg, steps = accumulated
    assert [steps[s]["skipped"] for s in range(1, STEPS + 1)] == [0, 1, 0, 0, 0, 0]
    assert all(len(steps[s]["indices"]) == 8 for s in steps)
    assert [e["identical"] for e in events(cfg) if e["event"] == "replicas"] == [True]


def test_a_kill_inside_a_checkpoint_write_resumes_from_the_previous_one(data, accumulated):
    """Rank 1 dies while writing the step-4 checkpoint: Ray Train restarts the workers, the torn
    checkpoint is rejected, and the run resumes from step 2 with a bitwise-identical loss curve
    over the same samples in the same order."""
    tmp, data_uri = data
    cfg = accum_engine(tmp, "accum-killed", fail_at_steps=[3], fail_rank=1, fail_in_checkpoint=True)
    fit(accum_spec(data_uri), cfg)
    log = events(cfg)
    rejected = [e for e in log if e["event"] == "checkpoint_rejected"]
    assert [e["checkpoint"].rsplit("/", 1)[1] for e in rejected] == ["step00000004"]  # died while writing it
    assert [e["resumed_from"].rsplit("/", 1)[1] for e in log if e["event"] == "start" and e["resumed_from"]] == \
        ["step00000002"]
    assert any(r["attempt"] == 1 for r in step_log(cfg)), "the run was not restarted"
    clean = accumulated[1]
    resumed = final_steps(cfg)
    for s in range(1, STEPS + 1):
        assert resumed[s]["loss"] == clean[s]["loss"], f"step {s}"  # bitwise in fp32
        assert resumed[s]["indices"] == clean[s]["indices"]  # the same samples, in order
    seen = [i for s in range(1, STEPS + 1) for i in resumed[s]["indices"]]
    assert len(seen) == len(set(seen))  # no sample repeated within the epoch
    assert [e["identical"] for e in log if e["event"] == "replicas"] == [True]


def test_a_two_worker_checkpoint_resumes_in_one_process_at_the_same_global_batch(data, accumulated):
    """resume_from another run's step-2 checkpoint (written by 2 Ray workers), continued without
    Ray by one process accumulating 4 micro-batches: DeepSpeed's universal checkpoint."""
    tmp, data_uri = data
    clean_cfg, clean = accumulated
    cfg = accum_engine(tmp, "accum-one-process", resume_from=f"{tmp}/ray/accum/checkpoints/step00000002")
    fit_in_process(accum_spec(data_uri), cfg)
    resumed = final_steps(cfg)
    assert sorted(resumed) == [3, 4, 5, 6]
    for s in (3, 4, 5, 6):
        assert resumed[s]["indices"] == clean[s]["indices"]
        assert resumed[s]["loss"] == pytest.approx(clean[s]["loss"], rel=1e-4)
    assert [e["world"] for e in events(cfg) if e["event"] == "start"] == [1]


def test_resuming_a_checkpoint_of_another_model_says_so(data, accumulated, tmp_path):
    tmp, data_uri = data
    config = model_config(PretrainConfig(data=data_uri, output="", model=ModelSpec("tiny", {"num_layers": 1})))
    spec = TrainSpec(model_factory=functools.partial(build_model, config), data_uri=data_uri, step_fn=lm_loss_step)
    cfg = engine(tmp_path, "other-model", num_workers=1, resume_from=f"{tmp}/ray/accum")
    with pytest.raises(RuntimeError, match="cannot resume from .*accum/checkpoints/step00000006"):
        fit_in_process(spec, cfg)


def test_consecutive_nonfinite_steps_stop_the_run_with_a_reason(data, tmp_path):
    _, data_uri = data
    cfg = engine(tmp_path, "all-nan", num_workers=1, max_consecutive_skips=2)
    with pytest.raises(TrainingStopped, match="2 consecutive optimizer steps skipped"):
        fit_in_process(accum_spec(data_uri, nonfinite_steps=[0, 1, 2]), cfg)
    assert max(final_steps(cfg)) == 2  # stopped, not restarted or continued


def test_tensor_parallel_run_resumes_exactly_and_its_checkpoint_loads_at_tp1(data, tmp_path):
    """TP=2 (2 Ray workers, one replica) killed after step 3 replays step 3 bitwise from its
    step-2 checkpoint; that checkpoint, continued in one process at TP=1 (DeepSpeed's universal
    checkpoint merging the shards, optimizer state included), gives the TP=2 losses; both
    export the single-file merged checkpoint."""
    tmp, data_uri = data
    export = functools.partial(export_checkpoint, data_uri=data_uri, metadata={})
    cfg = engine(tmp, "tp2", tensor_parallel=2, train_steps=4, fail_at_steps=[3], fail_rank=1)
    fit(spec_for(data_uri, export_fn=functools.partial(export, output=str(tmp_path / "tp2"))), cfg)
    log = step_log(cfg)
    first, replayed = ([r for r in log if r["step"] == 3 and r["attempt"] == a] for a in (0, 1))
    assert len(first) == len(replayed) == 1, "the run was not killed after step 3 and resumed"
    assert replayed[0]["loss"] == first[0]["loss"] and replayed[0]["indices"] == first[0]["indices"]  # bitwise
    assert [e["tensor_parallel"] for e in events(cfg) if e["event"] == "start"] == [2, 2]
    tp2 = final_steps(cfg)
    assert all(len(tp2[s]["indices"]) == 2 for s in tp2)  # one replica: the micro-batch is the global batch

    at_tp1 = engine(tmp, "tp2-at-tp1", num_workers=1, train_steps=4,
                    resume_from=f"{tmp}/ray/tp2/checkpoints/step00000002")
    fit_in_process(spec_for(data_uri, export_fn=functools.partial(export, output=str(tmp_path / "tp1"))), at_tp1)
    tp1 = final_steps(at_tp1)
    assert [(e["world"], e["tensor_parallel"]) for e in events(at_tp1) if e["event"] == "start"] == [(1, 1)]
    assert (tmp / "ray/tp2/checkpoints/step00000002/universal/COMPLETE.json").exists()  # converted by DeepSpeed
    assert sorted(tp1) == [3, 4]
    for s in (3, 4):
        assert tp1[s]["indices"] == tp2[s]["indices"]
        assert tp1[s]["loss"] == pytest.approx(tp2[s]["loss"], rel=1e-4)
    merged, _ = load_inference_checkpoint(tmp_path / "tp2")
    dense, _ = load_inference_checkpoint(tmp_path / "tp1")
    for (name, a), b in zip(merged.state_dict().items(), dense.state_dict().values()):
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-3, name  # Adam steps of lr 1e-3 apart at most
