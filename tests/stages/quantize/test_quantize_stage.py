"""The quantize stage end to end: streaming conversion, the perplexity gate (pass and fail),
MLflow records (a real SQLite store) and the CLI."""

import json

import pytest
import torch

from glm.checkpoint import load_inference_checkpoint, read_checkpoint_quantization, save_inference_checkpoint
from glm.config import padded_vocab_size, preset
from glm.model import GLMModel
from glm.quantization import QuantizedLinear, QuantSpec
from stages.quantize.__main__ import main
from stages.quantize.config import GateConfig, QuantizeConfig
from stages.quantize.quality import gmask_batches, heldout_windows
from stages.quantize.stage import QualityGateError, run
from stages.tracking import TrackingConfig
from tests.conftest import sample_texts


@pytest.fixture(scope="module")
def trained_checkpoint(tokenizer, tmp_path_factory):
    """A tiny GLM overfit for a few seconds on the gate text, so quantization noise shows in its
    perplexity; returns (checkpoint dir, gate text file)."""
    root = tmp_path_factory.mktemp("quantize")
    text = root / "heldout.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(2)))
    torch.manual_seed(0)
    model = GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer))))
    windows = heldout_windows(str(text), tokenizer, max_tokens=768, window=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        for inputs, _ in gmask_batches(windows, tokenizer, use_2d=True, batch_size=12):
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    save_inference_checkpoint(model.eval(), tokenizer, root / "fp", metadata={"stage": "test"})
    return root / "fp", text


def stage_config(tmp_path, checkpoint, text, **gate) -> QuantizeConfig:
    return QuantizeConfig(
        checkpoint=str(checkpoint), output=str(tmp_path / "out"), bits=4, group_size=32,
        gate=GateConfig(text=str(text), max_tokens=768, window=64, **gate),
        sample_prompts=["话说天下大势，[MASK]"], sample_max_new_tokens=4,
        tracking=TrackingConfig(enabled=True, experiment="quantize-test", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"),
    )


def mlflow_run(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("quantize-test")
    (run,) = client.search_runs([experiment.experiment_id])
    return run


@pytest.mark.integration
def test_stage_quantizes_gates_and_records(trained_checkpoint, tmp_path):
    checkpoint, text = trained_checkpoint
    report = run(stage_config(tmp_path, checkpoint, text, max_ppl_increase=0.5))
    ppl = report["perplexity"]
    assert set(ppl) == {"fp", "int8", "int4"} and report["gate_passed"]
    assert abs(ppl["int8"] / ppl["fp"] - 1) < 0.01  # INT8 is near lossless
    assert report["ppl_increase"] == pytest.approx(ppl["int4"] / ppl["fp"] - 1)
    assert report["weights"]["memory_ratio"] < 0.30

    model, _ = load_inference_checkpoint(tmp_path / "out")
    assert isinstance(model.layers[1].mlp.dense_4h_to_h, QuantizedLinear)
    assert read_checkpoint_quantization(tmp_path / "out") == QuantSpec(4, 32)
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["metadata"]
    assert meta["stage"] == "quantize" and meta["quantize_report"]["perplexity"] == ppl

    recorded = mlflow_run(tmp_path)
    assert recorded.info.status == "FINISHED" and recorded.data.tags["gate"] == "passed"
    metrics = recorded.data.metrics
    assert metrics["ppl_int4"] == pytest.approx(ppl["int4"]) and metrics["ppl_fp"] == pytest.approx(ppl["fp"])
    assert metrics["linear_bytes_quantized"] / metrics["linear_bytes_fp16"] == pytest.approx(
        report["weights"]["memory_ratio"])
    assert recorded.data.params["bits"] == "4"


@pytest.mark.integration
def test_gate_fails_the_run_when_the_limit_is_below_the_increase(trained_checkpoint, tmp_path, capsys):
    checkpoint, text = trained_checkpoint
    cfg = stage_config(tmp_path, checkpoint, text, max_ppl_increase=0.0)
    cfg.group_size = 0  # per-row INT4: the coarsest scheme, the clearest increase
    with pytest.raises(QualityGateError, match=r"quality gate failed: int4 perplexity .* above the limit"):
        run(cfg)
    assert not (tmp_path / "out").exists()  # nothing published
    recorded = mlflow_run(tmp_path)
    assert recorded.info.status == "FAILED" and recorded.data.tags["gate"] == "failed"
    assert recorded.data.metrics["ppl_increase_int4"] > 0.0

    # the CLI reports it and exits with status 1
    config = tmp_path / "q.yaml"
    config.write_text(f"checkpoint: {checkpoint}\noutput: {tmp_path / 'cli'}\nbits: 4\ngate: {{text: {text}, "
                      f"max_tokens: 256, window: 64}}\nsample_prompts: []\n")
    assert main(["--config", str(config), "--max-ppl-increase", "0"]) == 1
    assert "error: quality gate failed" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_cli_help_and_config_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "quality gate" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: x\nbits: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(bad)])
    assert e.value.code == 2 and "bits: 3 is not one of [4, 8]" in capsys.readouterr().err
    bad.write_text("output: x\n")
    assert main(["--config", str(bad)]) == 2
    assert "`checkpoint`" in capsys.readouterr().err
