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
from stages.rlhf.losses import token_logprobs
from stages.rlhf.models import DPOModel, PPOModel, RuleReward
from stages.rlhf.ppo import (clip_grad_groups, generate, group_iteration, ppo_iteration, ppo_validation_step,
                              prompts_of, response_rows)
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
    # the random tiny model almost never stops within new_tokens: score its cut responses (a token
    # share judges any prefix) instead of bootstrapping them from a critic that never saw a score
    cfg = PPOConfig(max_new_tokens=new_tokens, ppo_epochs=2, minibatches=2, kl_coef=0.05, adaptive_kl=True,
                    kl_target=4.0, kl_horizon=32, truncated="score")
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
    assert all(h["actor_grad_norm"] > 0 and h["critic_grad_norm"] > 0 for h in history)  # clipped apart
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


def prompt_batch(tokenizer, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    rows = [prompt_row(rng.sample(range(100, 1500), rng.randint(3, 6)), tokenizer, 8) for _ in range(n)]
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def test_rollouts_are_scored_at_the_temperature_they_were_sampled_at(tokenizer):
    actor, temperature, n = tiny_glm(tokenizer), 0.05, 2000  # near-uniform logits: a low temperature
    prompts = prompts_of(prompt_batch(tokenizer, 1)) * n
    cfg = PPOConfig(max_new_tokens=1, temperature=temperature)
    responses, stops = generate(actor, prompts, tokenizer.special, cfg, len(tokenizer), seed=5)
    rows = response_rows(prompts[:1], responses[:1], stops[:1], tokenizer.special, True, 1, "cpu")
    with torch.no_grad():
        logits = actor(**{k: rows[k] for k in ("input_ids", "position_ids", "block_position_ids", "segment_ids",
                                                  "prefix_mask")}).logits
    at = int((rows["labels"][0] != -100).nonzero()[0])  # [sop]: its label is the first response token
    logits = logits[0, at, :len(tokenizer)]
    top = int(logits.argmax())
    sampled_share = np.mean([r[:1] == [top] for r in responses])
    scored = float(token_logprobs(logits[None, None], torch.tensor([[top]]), temperature).exp())
    untempered = float(token_logprobs(logits[None, None], torch.tensor([[top]])).exp())
    bound = 4 * np.sqrt(scored * (1 - scored) / n)
    assert abs(sampled_share - scored) < bound, (sampled_share, scored, untempered)
    assert abs(untempered - scored) > 2 * bound  # the test tells the two apart
    with pytest.raises(Exception, match="top_p"):
        PPOConfig(top_p=0.9)


def test_rollouts_stop_on_the_chat_stop_tokens_and_label_the_stop_taken(tokenizer):
    actor, special = tiny_glm(tokenizer), tokenizer.special
    prompts = prompts_of(prompt_batch(tokenizer, 2))
    cfg = PPOConfig(max_new_tokens=3)
    greedy, stops = generate(actor, prompts, special, cfg, len(tokenizer), seed=0, sample=False)
    assert stops == [None, None] and all(len(g) == 3 for g in greedy)  # cut
    first = greedy[0][0]
    spans, stops = generate(actor, prompts[:1], special, cfg, len(tokenizer), 0, sample=False, stop_ids=[first])
    assert spans == [[]] and stops == [first]  # a chat format's stop token (e.g. <|user|>) ends the reply
    rows = response_rows([prompts[0], prompts[0]], [[], greedy[0]], [special.eos, None], special, True, 3, "cpu")
    labels = rows["labels"]
    assert labels[0][labels[0] != -100].tolist() == [special.eos]  # the stop the actor took, not [eop]
    assert labels[1][labels[1] != -100].tolist() == greedy[0]  # cut: no stop action


def test_actor_and_critic_gradients_are_clipped_each_by_its_own_norm():
    torch.manual_seed(0)
    actor, critic = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    x = torch.randn(4, 3)
    (0.01 * actor(x).square().sum() + 1000 * critic(x).square().sum()).backward()
    actor_grads = [p.grad.clone() for p in actor.parameters()]
    norms = clip_grad_groups({"actor": list(actor.parameters()), "critic": list(critic.parameters())}, 1.0)
    assert norms["actor"] < 1.0 < norms["critic"]
    assert all(torch.equal(p.grad, g) for p, g in zip(actor.parameters(), actor_grads))  # untouched by the critic
    assert float(torch.cat([p.grad.flatten() for p in critic.parameters()]).norm()) == pytest.approx(1.0, rel=1e-4)


def test_the_warm_up_counts_engine_steps_like_train_steps():
    from stages.engine.loop import lr_lambda

    f = lr_lambda(EngineConfig(train_steps=8, optim=OptimConfig(warmup_steps=2, min_lr_ratio=0.1)), steps_per_step=4)
    assert f(3) == pytest.approx(0.5) and f(7) == pytest.approx(1.0)  # 2 engine steps of 4 optimizer steps
    assert f(8) == pytest.approx(1.0) and f(32) == pytest.approx(0.1) and f(20) > 0.5


def group_engine(tokenizer, iterations: int = 2):
    actor = tiny_glm(tokenizer)
    model = PPOModel(actor, None, tiny_glm(tokenizer), RuleReward(list(range(0, 1500)), actor.config.vocab_size))
    return engine_for(model.train(), iterations, lr=1e-2, steps_per_step=2)


@pytest.mark.parametrize("mode", ["grpo", "rloo"])
def test_a_critic_free_iteration_trains_the_actor_and_resumes_exactly(tokenizer, mode):
    import copy

    cfg = PPOConfig(max_new_tokens=4, samples_per_prompt=3, minibatches=2, kl_coef=0.1)
    batch = prompt_batch(tokenizer, 2)

    def iteration(engine, step):
        return group_iteration(engine, batch, IterationContext(step, 0, 1, 7, {}), cfg, tokenizer.special,
                               len(tokenizer), mode)

    clean = group_engine(tokenizer)
    assert clean.module.critic is None and set(clean.module.clip_groups()) == {"actor"}
    before = clean.module.actor.lm_head.weight.detach().clone()
    first = iteration(clean, 0)
    assert not torch.equal(clean.module.actor.lm_head.weight, before)
    assert all(np.isfinite(v) for v in first.values()) and 0 <= first["flat_groups"] <= 1
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)  # the rollout came from the reference's weights
    second = iteration(clean, 1)
    # a restart after step 1: fresh modules given the checkpointed weights, optimizer and schedule
    other = group_engine(tokenizer)
    iteration(other, 0)
    saved = copy.deepcopy({"module": other.module.state_dict(), "optimizer": other.optimizer.state_dict(),
                           "scheduler": other.scheduler.state_dict()})
    resumed = group_engine(tokenizer)
    for name, value in saved.items():
        getattr(resumed, name).load_state_dict(value)
    again = iteration(resumed, 1)
    timing = ("generation_s", "scoring_s", "training_s", "generation_share")
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in second.items() if k not in timing}


def test_validation_scores_seeded_samples_and_the_greedy_answer(tokenizer):
    from stages.rlhf.config import RewardsConfig

    engine = group_engine(tokenizer, 1)
    cfg = PPOConfig(max_new_tokens=3, validation_samples=3, temperature=0.8)
    rewards = RewardsConfig(model=1.0, length=0.5, min_tokens=0, max_tokens=2)
    batch = prompt_batch(tokenizer, 2, seed=9)
    with torch.no_grad():
        out = ppo_validation_step(engine, batch, cfg, tokenizer, rewards)
        again = ppo_validation_step(engine, batch, cfg, tokenizer, rewards)
    assert {k: float(v) for k, v in out.items() if k != "samples"} == \
        {k: float(v) for k, v in again.items() if k != "samples"}  # the same seeds every time
    assert out["samples"] == again["samples"]
    assert {"reward", "reward_std", "greedy_reward", "kl", "truncated", "loss"} <= set(out)
    assert float(out["kl"]) == pytest.approx(0.0, abs=1e-5) and float(out["truncated"]) == 1.0
    assert float(out["loss"]) == -float(out["reward"])
    [first, _] = out["samples"]
    assert isinstance(first["response"], str) and len(first["samples"]) == 3
    scores = [s["score"] for item in out["samples"] for s in item["samples"]]
    assert float(out["reward"]) == pytest.approx(np.mean(scores), abs=1e-3)


@pytest.mark.parametrize("mode", ["ppo", "rloo"])
def test_the_stage_wires_a_policy_gradient_mode_with_rule_rewards_onto_the_engine(tokenizer, tmp_path, mode):
    from glm.checkpoint import save_inference_checkpoint
    from stages.rlhf.config import RewardsConfig, RLHFConfig
    from stages.rlhf.stage import train_spec

    save_inference_checkpoint(tiny_glm(tokenizer), tokenizer, tmp_path / "sft")
    cfg = RLHFConfig(mode=mode, base=str(tmp_path / "sft"), output=str(tmp_path / "out"),
                     rewards=RewardsConfig(model=0.0, length=1.0, max_tokens=2, format=0.5),
                     ppo=PPOConfig(max_new_tokens=3, samples_per_prompt=2, minibatches=2, validation_samples=2))
    cfg.data.output = str(tmp_path / "prompts")
    spec = train_spec(cfg, {"splits": {}, "sources": {}})
    assert spec.optimizer_steps_per_step == 2 and spec.clips_gradients == (mode == "ppo")
    model = spec.model_factory()
    assert model.reward is None and (model.critic is None) == (mode != "ppo")
    engine = LocalEngine(model, EngineConfig(train_steps=1, optim=OptimConfig(lr=1e-3, warmup_steps=1)), 2,
                         clips_gradients=spec.clips_gradients)
    out = spec.iteration_fn(engine, prompt_batch(tokenizer, 2), IterationContext(0, 0, 1, 0, {}))
    assert out["reward_length"] == 0.0 and out["reward_format"] == 0.0 and out["truncated"] == 1.0  # all cut at 3
    assert out["reward_model"] == 0.0 and np.isfinite(out["loss"])
    with torch.no_grad():
        val = spec.step_fn(engine, prompt_batch(tokenizer, 2, seed=1))
    assert float(val["reward"]) == 0.0 and len(val["samples"][0]["samples"]) == 2
