"""The smoke pipeline end to end on tiny settings: data stage -> engine -> generation."""

import pytest

from conftest import SAMPLE
from glm.checkpoint import load_inference_checkpoint
from glm.config import ModelSpec
from pipelines.smoke import SmokeConfig, run
from stages.data.config import CorpusSource, DataConfig, MIPConfig, ObjectiveConfig, TokenizerSettings
from stages.engine import EngineConfig
from stages.pretrain.config import PretrainConfig

pytestmark = pytest.mark.integration


def test_smoke_pipeline_trains_and_generates(tmp_path, ray_instance, tokenizer, capsys):
    cfg = SmokeConfig(
        data=DataConfig(sources=[CorpusSource(uri=str(SAMPLE / "pretrain/en_tinyshakespeare.jsonl"))],
                        output=str(tmp_path / "data"), tokenizer=TokenizerSettings(path=str(tokenizer.save(tmp_path))),
                        objective=ObjectiveConfig(seq_len=64, mask_window=32), mip=MIPConfig(token_share=0.0),
                        num_buckets=2),
        pretrain=PretrainConfig(output=str(tmp_path / "model"), model=ModelSpec("tiny"),
                                engine=EngineConfig(run_name="smoke", storage_path=str(tmp_path / "ray"),
                                                    micro_batch_size=2, train_steps=3, checkpoint_every=3)),
        max_new_tokens=3)
    path = run(cfg)
    out = capsys.readouterr().out
    assert "fill 'First Citizen:\\n'" in out and "chat '你好'" in out
    model, tok = load_inference_checkpoint(path)
    assert model.config.num_layers == 2 and len(tok) == len(tokenizer)
