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


def _tiny_checkpoint(tokenizer, directory):
    torch.manual_seed(0)
    model = GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)))).eval()
    return model, save_inference_checkpoint(model, tokenizer, directory)


def test_every_writer_records_a_checksum_that_loading_verifies(tokenizer, tmp_path):
    import hashlib

    from glm.checkpoint import publish_checkpoint, write_checkpoint

    model, path = _tiny_checkpoint(tokenizer, tmp_path / "saved")
    weights = (tmp_path / "saved" / "model.safetensors").read_bytes()
    record = json.loads((tmp_path / "saved" / "config.json").read_text())["weights"]
    assert record == {"file": "model.safetensors", "bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    write_checkpoint(tmp_path / "written", model.config, {k: v.contiguous() for k, v in model.state_dict().items()},
                     tokenizer.to_bytes())
    publish_checkpoint(tmp_path / "saved", tmp_path / "published")
    for name in ("written", "published"):
        data = json.loads((tmp_path / name / "config.json").read_text())
        assert data["weights"]["sha256"] == hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest()
        load_inference_checkpoint(tmp_path / name)


def test_damaged_weights_are_refused_naming_the_file(tokenizer, tmp_path):
    from glm.checkpoint import check_checkpoint_files, publish_checkpoint

    _, path = _tiny_checkpoint(tokenizer, tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors are damaged: SHA-256"):
        load_inference_checkpoint(path)
    with pytest.raises(ValueError, match="damaged"):
        publish_checkpoint(tmp_path / "c", tmp_path / "copy")  # never republished
    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ValueError, match=r"model\.safetensors are damaged: \d+ bytes, but the checkpoint recorded"):
        load_inference_checkpoint(path)
    with pytest.raises(ValueError, match="truncated"):
        check_checkpoint_files(path)


def test_non_finite_weights_are_refused_naming_the_tensor(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)))).eval()
    with torch.no_grad():
        model.layers[1].mlp.dense_4h_to_h.weight[0, 3] = float("nan")
    save_inference_checkpoint(model, tokenizer, tmp_path / "c")  # the checksum is fine: the values are not
    with pytest.raises(ValueError, match=r"'layers\.1\.mlp\.dense_4h_to_h\.weight' has 1 non-finite values"):
        load_inference_checkpoint(tmp_path / "c")
