"""The three RLHF objectives optimise what they claim, in-process on a tiny GLM, with the same
step and iteration functions the engine runs (LocalEngine: the engine's optimizer and
schedule without Ray / DeepSpeed)."""

import random

import numpy as np
import pytest
import torch

from glm.config import padded_vocab_size, preset
from glm.model import GLMModel
from glm.schema import pack_samples
from glm.value_head import ScalarHeadModel
from stages.engine.config import EngineConfig, OptimConfig
from stages.engine.local import LocalEngine
from stages.engine.loop import IterationContext
from stages.rlhf.config import PPOConfig
from stages.rlhf.data import prompt_row, side_sample
from stages.rlhf.models import DPOModel, PPOModel, RuleReward
from stages.rlhf.ppo import ppo_iteration
from stages.rlhf.steps import dpo_step, reward_step

MAX_LEN = 24
MARKER = 7  # a token id; "preferred responses contain it"


def tiny_glm(tokenizer, seed: int = 0) -> GLMModel:
    torch.manual_seed(seed)
    # full embedding gradients (no EGS): the synthetic tasks hinge on one token's embedding
    return GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)), embedding_grad_shrink=1.0))


def marker_pairs(tokenizer, n: int, seed: int) -> dict[str, torch.Tensor]:
    """n pair rows: a random prompt and reply; chosen has MARKER at a random place, rejected
    another random token there (same length, so only the marker tells them apart)."""
    rng = random.Random(seed)
    words = [t for t in range(100, 1500) if t != MARKER]
    rows = []
    for _ in range(n):
        prompt = rng.sample(words, rng.randint(3, 6))
        reply = rng.sample(words, rng.randint(3, 8))
        at = rng.randint(0, len(reply))
        chosen, rejected = reply[:at] + [MARKER] + reply[at:], reply[:at] + [rng.choice(words)] + reply[at:]
        sides = [side_sample(prompt, r, tokenizer, MAX_LEN, use_2d=True)[0] for r in (chosen, rejected)]
        rows.append(pack_samples(sides, 2 * MAX_LEN, tokenizer.special.pad))
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def engine_for(model, steps: int, lr: float, steps_per_step: int = 1) -> LocalEngine:
    cfg = EngineConfig(train_steps=steps, optim=OptimConfig(lr=lr, warmup_steps=2, weight_decay=0.0))
    return LocalEngine(model, cfg, steps_per_step)


def batches(data: dict, size: int, steps: int):
    for s in range(steps):
        idx = torch.arange(s * size, (s + 1) * size) % len(data["input_ids"])
        yield {k: v[idx] for k, v in data.items()}


def test_reward_model_learns_a_marker_preference(tokenizer):
    train, held_out = marker_pairs(tokenizer, 256, seed=1), marker_pairs(tokenizer, 64, seed=2)
    engine = engine_for(ScalarHeadModel(tiny_glm(tokenizer)).train(), steps=40, lr=3e-3)
    with torch.no_grad():
        before = reward_step(engine, held_out)["accuracy"]
    for batch in batches(train, 16, 40):
        out = reward_step(engine, batch)
        engine.backward(out["loss"])
        engine.step()
    engine.eval()
    with torch.no_grad():
        after = reward_step(engine, held_out)
    assert float(after["accuracy"]) > 0.9, (float(before), {k: float(v) for k, v in after.items()})
    assert float(after["margin"]) > 0


def test_dpo_raises_the_chosen_over_rejected_log_ratio(tokenizer):
    train, held_out = marker_pairs(tokenizer, 128, seed=3), marker_pairs(tokenizer, 32, seed=4)
    engine = engine_for(DPOModel(tiny_glm(tokenizer), tiny_glm(tokenizer)).train(), steps=20, lr=2e-3)
    with torch.no_grad():
        before = dpo_step(engine, held_out, beta=0.1)
    assert float(before["reward_margin"]) == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    for batch in batches(train, 16, 20):
        out = dpo_step(engine, batch, beta=0.1)
        engine.backward(out["loss"])
        engine.step()
    with torch.no_grad():
        after = dpo_step(engine, held_out, beta=0.1)
    # log pi/pi_ref of chosen minus that of rejected (= margin / beta), on pairs it never saw
    assert float(after["reward_margin"]) / 0.1 > 1.0, {k: float(v) for k, v in after.items()}
    assert float(after["reward_accuracy"]) > 0.8
    assert float(after["loss"]) < float(before["loss"])


def test_ppo_with_a_rule_reward_raises_the_reward_with_bounded_kl(tokenizer):
    iterations, prompts_per_iteration, new_tokens = 30, 16, 8
    target = list(range(100, 200))  # reward: share of response tokens among 100 of the ~3000 ids
    actor = tiny_glm(tokenizer)
    reference = tiny_glm(tokenizer)
    critic = ScalarHeadModel(tiny_glm(tokenizer))
    model = PPOModel(actor, critic, reference, RuleReward(target, actor.config.vocab_size)).train()
    cfg = PPOConfig(max_new_tokens=new_tokens, ppo_epochs=2, minibatches=2, kl_coef=0.05, adaptive_kl=True,
                    kl_target=4.0, kl_horizon=32)
    engine = engine_for(model, iterations, lr=1e-2, steps_per_step=4)
    rng = random.Random(0)
    rows = [prompt_row(rng.sample(range(100, 1500), rng.randint(3, 6)), tokenizer, 8) for _ in range(64)]
    data = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    state, history = {}, []
    for step, batch in enumerate(batches(data, prompts_per_iteration, iterations)):
        ctx = IterationContext(step=step, rank=0, world=1, seed=3, state=state)
        history.append(ppo_iteration(engine, batch, ctx, cfg, tokenizer.special, len(tokenizer)))
    rewards = [round(h["reward_mean"], 3) for h in history]
    kls = [round(h["kl"], 2) for h in history]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > 5 * first and last > first + 0.3, rewards  # ~0.03 (100 / 3000 ids) at the start
    assert all(0 <= h["clip_frac"] <= 1 and np.isfinite(h["loss"]) for h in history)
    # KL to the reference (nats per response): finite and under new_tokens x log(vocab), the
    # KL of a collapsed policy, and the adaptive controller pushed back once it passed the target
    assert all(np.isfinite(kls)) and max(kls) < new_tokens * np.log(len(tokenizer)), kls
    assert state["kl_coef"] > cfg.kl_coef, (state["kl_coef"], kls)


def test_ppo_ptx_adds_a_language_modelling_loss_on_prepared_rows(tokenizer, tmp_path):
    from conftest import SAMPLE
    from stages.rlhf.config import PreferenceDataConfig, PreferenceSource
    from stages.rlhf.data import prepare

    ptx = PreferenceDataConfig(sources=[PreferenceSource(uri=str(SAMPLE / "preference/zh_oasst1_pairs.jsonl"))],
                               max_len=32, max_samples=8, output=str(tmp_path / "ptx"))
    prepare(ptx, tokenizer, layout="pairs", use_2d=True, fingerprint="ptx", log=lambda *_: None)
    actor = tiny_glm(tokenizer)
    model = PPOModel(actor, ScalarHeadModel(tiny_glm(tokenizer)), tiny_glm(tokenizer),
                     RuleReward([5], actor.config.vocab_size)).train()
    cfg = PPOConfig(max_new_tokens=4, minibatches=2, ptx_coef=0.5, ptx_data=ptx.output)
    engine = engine_for(model, 1, lr=1e-3, steps_per_step=2)
    rows = [prompt_row([100 + i, 200 + i], tokenizer, 8) for i in range(4)]
    batch = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    before = actor.lm_head.weight.detach().clone()
    out = ppo_iteration(engine, batch, IterationContext(0, 0, 1, 0, {}), cfg, tokenizer.special, len(tokenizer))
    assert 0 < out["ptx_loss"] < 20 and np.isfinite(out["loss"])
    assert not torch.equal(actor.lm_head.weight, before)


def test_the_critic_gets_its_own_learning_rate(tokenizer):
    actor = tiny_glm(tokenizer)
    model = PPOModel(actor, ScalarHeadModel(tiny_glm(tokenizer)), tiny_glm(tokenizer),
                     RuleReward([5], actor.config.vocab_size), critic_lr_scale=0.5)
    engine = engine_for(model, 1, lr=1e-3)
    critic = {id(p) for p in model.critic.parameters()}
    lrs = {id(p): g["lr"] for g in engine.optimizer.param_groups for p in g["params"]}
    assert all(lrs[i] == pytest.approx(0.5e-3 * 0.5) for i in critic)  # x 0.5: first warm-up step
    assert all(lrs[id(p)] == pytest.approx(1e-3 * 0.5) for p in model.actor.parameters())
    assert not any(id(p) in lrs for p in model.reference.parameters())  # frozen: no optimizer state
