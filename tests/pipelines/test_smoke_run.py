"""The interim smoke driver end to end on a few steps: loss, generation, a loadable checkpoint."""

from conftest import SAMPLE
from glm.checkpoint import load_inference_checkpoint
from glm.config import ModelSpec
from pipelines.smoke import SmokeConfig, run


def test_smoke_run_writes_a_loadable_checkpoint(tmp_path, capsys):
    cfg = SmokeConfig(
        corpus=str(SAMPLE / "pretrain/en_tinyshakespeare.jsonl"), vocab_size=800, model=ModelSpec("tiny"),
        seq_len=64, batch_size=2, steps=3, log_every=1, max_new_tokens=3, output_dir=str(tmp_path),
    )
    path = run(cfg)
    out = capsys.readouterr().out
    assert "step    3/3" in out and "continuations" in out
    model, tokenizer = load_inference_checkpoint(path)
    assert model.config.num_layers == 2 and len(tokenizer) == 800
