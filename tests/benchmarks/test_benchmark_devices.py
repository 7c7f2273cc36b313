"""The training, PPO and evaluation benchmarks put models and tensors on the device they run on:
on the meta device (a tensor made on a hard-coded device would meet a meta tensor and fail),
on CPU, and on CUDA (`gpu`, part 1 of the GPU suite)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import eval_speed  # noqa: E402
import ppo_throughput  # noqa: E402
import train_throughput  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class DeviceCheckingModel(torch.nn.Module):
    """Stands in for GLMModel: asserts every input is on its parameter's device, answers logits on CPU."""

    def __init__(self, device: str, vocab: int = 64):
        super().__init__()
        from glm.config import preset

        self.config = preset("tiny", vocab_size=vocab)
        self.weight = torch.nn.Parameter(torch.zeros(1, device=device))
        self.vocab, self.calls = vocab, 0

    def forward(self, *args, **kwargs):
        for t in [*args, *kwargs.values()]:
            if isinstance(t, torch.Tensor):
                assert t.device == self.weight.device, f"input on {t.device}, model on {self.weight.device}"
        self.calls += 1
        n = args[0].shape[1]
        return type("Out", (), {"logits": torch.arange(n * self.vocab, dtype=torch.float).view(1, n, self.vocab)})()


def test_uncached_rollout_builds_its_inputs_on_the_models_device():
    from glm.schema import SpecialTokens

    special = SpecialTokens(mask=50, smask=51, gmask=52, sop=53, eop=54, pad=55, eos=56)
    model = DeviceCheckingModel("meta")
    out = ppo_throughput.uncached_generate(model, [[1, 2, 3, 52]], special, new_tokens=3, vocab_limit=40)
    assert model.calls == 3 and out == [[39, 39, 39]]


def test_training_batches_go_to_the_device():
    rows = {"input_ids": [[1, 2]], "labels": [[2, -100]]}
    batch = train_throughput.to_batch({k: torch.tensor(v).numpy() for k, v in rows.items()}, "meta")
    assert all(t.device.type == "meta" and t.dtype == torch.long for t in batch.values())


def test_the_eval_model_is_built_on_the_device(tokenizer):
    model, tokenizer = eval_speed.build_model(None, "meta", "tiny", tokenizer=tokenizer)
    assert {p.device.type for p in model.parameters()} == {"meta"} and not model.training
    assert model.config.vocab_size >= len(tokenizer)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer):
    """A tiny data-stage output (Parquet shards + manifest) written without Ray."""
    import gpu_suite
    from glm.config import padded_vocab_size
    from glm.schema import COLUMNS
    from stages.sft.data import write_prepared

    rows = gpu_suite.synthetic_rows(12, 32, padded_vocab_size(len(tokenizer)), tokenizer.special, True, 0,
                                    token_limit=len(tokenizer))
    as_dicts = [{c: rows[c][i].tolist() for c in COLUMNS} for i in range(12)]
    out = str(tmp_path_factory.mktemp("shards") / "data")
    write_prepared(out, {"train": (as_dicts, 12)}, tokenizer,
                   {"schema": {"columns": list(COLUMNS), "seq_len": 32, "position_encoding": "rope_2d"}})
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_bare_training_loop_runs_on_the_device(device, shards, tokenizer):
    from glm.config import padded_vocab_size, preset

    config = preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)), max_seq_len=32)
    tokens_per_s = train_throughput.bare_loop(config, shards, steps=train_throughput.WARMUP + 2, micro=2, lr=1e-3,
                                              threads=1, device=device, precision="bf16" if device == "cuda" else "fp32")
    assert tokens_per_s > 0


@pytest.mark.parametrize("device", DEVICES)
def test_ppo_iteration_and_rollouts_run_on_the_device(device):
    s = ppo_throughput.setup("tiny", prompts=2, iterations=2, new_tokens=4, max_prompt_len=24, device=device,
                             log=lambda *a: None)
    assert {p.device.type for p in s["model"].parameters()} == {device}
    ppo = ppo_throughput.run_iterations(s, 2, log=lambda *a: None)
    assert ppo["iteration_s"] > 0
    rollout = ppo_throughput.rollout_comparison(s, log=lambda *a: None)
    assert rollout["rollout_tokens_per_s"] > 0 and rollout["baseline_rollout_tokens_per_s"] > 0
    if device == "cpu":  # cached + batched == uncached, one at a time (GPU kernels may break near-ties)
        assert rollout["same_greedy_outputs"] == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_eval_scoring_runs_on_the_device(device, tokenizer):
    model, tokenizer = eval_speed.build_model(None, device, "tiny", tokenizer=tokenizer)
    r = eval_speed.measure(model, tokenizer, items=4, batch_size=2, repeats=1, log=lambda *a: None)
    assert r["device"].startswith(device) and r["items"] == 4
    assert r["max_logprob_diff"] < 1e-3  # batched and one-at-a-time scoring agree
