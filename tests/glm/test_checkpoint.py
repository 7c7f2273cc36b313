"""The inference checkpoint: safetensors + JSON config + tokenizer, loaded back exactly."""

import json

import pytest
import torch

from glm.checkpoint import load_inference_checkpoint, read_checkpoint_config, save_inference_checkpoint
from glm.config import padded_vocab_size, preset
from glm.model import GLMModel


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_gives_identical_logits(tokenizer, tmp_path, tied):
    torch.manual_seed(0)
    model = GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)), tie_word_embeddings=tied)).eval()
    out_dir = tmp_path / "ckpt"
    save_inference_checkpoint(model, tokenizer, out_dir, metadata={"stage": "test"})
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert not list(tmp_path.glob("*.partial"))
    loaded, tok = load_inference_checkpoint(out_dir)
    x = torch.tensor([tokenizer.encode("话说天下大势 The quick brown fox")])
    pos = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        assert torch.equal(loaded(x, pos).logits, model(x, pos).logits)
    assert tok.encode("abc") == tokenizer.encode("abc")
    config, meta = read_checkpoint_config(out_dir)
    assert config == model.config and meta == {"stage": "test"}
    assert (loaded.lm_head is None) == tied


def test_load_in_bfloat16_and_overwrite(tokenizer, tmp_path):
    model = GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer))))
    save_inference_checkpoint(model, tokenizer, tmp_path / "c")
    save_inference_checkpoint(model, tokenizer, f"file://{tmp_path / 'c'}")  # replaces in place
    loaded, _ = load_inference_checkpoint(tmp_path / "c", dtype=torch.bfloat16)
    assert loaded.word_embeddings.weight.dtype == torch.bfloat16


def test_bad_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_inference_checkpoint(tmp_path / "nope")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format 'other'"):
        read_checkpoint_config(tmp_path / "c")
