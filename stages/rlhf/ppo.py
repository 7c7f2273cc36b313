"""PPO on the training engine: one engine step = one PPO iteration on every worker.

    rollout   the actor samples one response per prompt of the worker's batch (batched,
              KV cache, a sampling seed derived from (seed, step, rank): a resumed run
              draws the same responses)
    scoring   actor and reference log-probs, critic values, the reward (model or rule),
              per-token KL penalty, GAE, whitened advantages
    training  ppo_epochs x minibatches optimizer steps on the clipped policy loss + vf_coef x
              the clipped value loss - entropy bonus (+ PPO-ptx), via engine.backward/step

The KL coefficient and the running reward moments live in the engine-checkpointed stage
state; they are updated from all-rank statistics so every rank holds the same state.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from glm.generation import GenerationConfig, SpanQuery, generate_spans
from glm.schema import SpecialTokens, layout_prompted, pack_samples
from glm.value_head import last_token_index
from stages.rlhf.config import PPOConfig
from stages.rlhf.losses import (
    IGNORE_INDEX, adaptive_kl_coef, gae, kl_penalty_rewards, masked_mean, masked_whiten, moments_std, policy_loss,
    token_entropy, token_logprobs, update_moments, value_loss,
)
from stages.rlhf.steps import INPUTS

_PTX_SOURCES: dict[str, object] = {}  # per-process cache of the PPO-ptx rows (read once per worker)


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, ...), independent of any RNG state."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def prompts_of(batch: dict) -> list[list[int]]:
    """The Part-A tokens (prompt + [gMASK]) of each prompt row."""
    ids, seg = batch["input_ids"].tolist(), batch["segment_ids"].tolist()
    return [[t for t, s in zip(r, g) if s == 1] for r, g in zip(ids, seg)]


def generate(actor, prompts: list[list[int]], special: SpecialTokens, cfg: PPOConfig, vocab_limit: int,
             seed: int, sample: bool = True) -> tuple[list[list[int]], list[bool]]:
    """Sampled (or greedy) responses and whether each stopped by itself (else it hit max_new_tokens)."""
    config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=sample, temperature=cfg.temperature,
                              top_k=cfg.top_k, top_p=cfg.top_p, seed=seed)
    queries = [SpanQuery(p, len(p) - 1, True) for p in prompts]
    was_training = actor.training
    actor.eval()
    spans = generate_spans(actor, queries, special, config, vocab_limit=vocab_limit)
    actor.train(was_training)
    return spans, [len(s) < cfg.max_new_tokens for s in spans]


def response_rows(prompts: list[list[int]], responses: list[list[int]], stopped: list[bool], special: SpecialTokens,
                  use_2d: bool, max_new_tokens: int, device) -> dict[str, torch.Tensor]:
    """Prompt + [gMASK] [sop] response rows (the reward model's training layout). Labels are
    the actions: the response tokens, and [eop] only where the actor stopped (a stop is an
    action too; a cut response has no final [eop]; a stop on end-of-text is scored as [eop],
    since generate_spans does not return which stop token ended a span)."""
    seq_len = max(len(p) for p in prompts) + 1 + max_new_tokens
    rows = []
    for prompt, response, stop in zip(prompts, responses, stopped):
        sample = layout_prompted(prompt[:-1], response, special, use_2d=use_2d, mask_token=special.gmask)
        if not stop:
            sample.labels[-1] = IGNORE_INDEX
        rows.append(pack_samples([sample], seq_len, special.pad))
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long, device=device) for k in rows[0]}


@torch.no_grad()
def score(model, rows: dict, responses: list[list[int]]) -> torch.Tensor:
    """(B,) sequence scores: the reward model's value at the response's last token, or the rule."""
    from stages.rlhf.models import RuleReward

    if isinstance(model.reward, RuleReward):
        return model.reward.score(responses).to(rows["input_ids"].device)
    values = model("reward", **{k: rows[k] for k in INPUTS})
    return values[torch.arange(values.shape[0]), last_token_index(rows["segment_ids"], 1)]


def _all_values(values: torch.Tensor) -> torch.Tensor:
    """The values of every rank concatenated (this rank's alone outside torch.distributed)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return values
    out = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(out, values.contiguous())
    return torch.cat(out)


def _ptx_rows(uri: str, step: int, rank: int, world: int, n: int, device) -> dict[str, torch.Tensor]:
    """n pretraining rows for this rank and step, positioned by (step, rank): exact on resume."""
    from stages.engine.data import ShardSource

    if uri not in _PTX_SOURCES:
        _PTX_SOURCES[uri] = ShardSource(uri, "train")
    source = _PTX_SOURCES[uri]
    idx, _ = source.indices((step * world + rank) * n, n)
    return {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in source.rows(idx).items()}


def ppo_iteration(engine, batch: dict, ctx, cfg: PPOConfig, special: SpecialTokens, vocab_limit: int) -> dict:
    """One PPO iteration (the engine's iteration_fn); returns this rank's metrics."""
    model = engine.module
    state = ctx.state
    state.setdefault("kl_coef", cfg.kl_coef)
    device = batch["input_ids"].device
    t0 = time.time()

    prompts = prompts_of(batch)
    responses, stopped = generate(model.actor, prompts, special, cfg, vocab_limit, seed_of(ctx.seed, ctx.step, ctx.rank))
    t_gen = time.time()

    rows = response_rows(prompts, responses, stopped, special, model.actor.config.uses_2d_positions,
                         cfg.max_new_tokens, device)
    inputs = {k: rows[k] for k in INPUTS}
    labels = rows["labels"]
    mask = (labels != IGNORE_INDEX).float()
    with torch.no_grad():
        old_logprobs = token_logprobs(model("actor", **inputs), labels)
        ref_logprobs = token_logprobs(model("reference", **inputs), labels)
        old_values = model("critic", **inputs) * mask
        raw = score(model, rows, responses)
        everyone = _all_values(raw.float())
        state["moments"] = update_moments(state.get("moments", {}), everyone.tolist())
        scores = raw
        if cfg.normalize_reward:
            scores = (raw - state["moments"]["mean"]) / max(moments_std(state["moments"]), 1e-6)
            if cfg.reward_clip:
                scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        kl_per_row = ((old_logprobs - ref_logprobs) * mask).sum(-1)
        rewards = kl_penalty_rewards(old_logprobs, ref_logprobs, scores, mask, state["kl_coef"])
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
    t_score = time.time()

    B = len(prompts)
    ptx = _ptx_rows(cfg.ptx_data, ctx.step, ctx.rank, ctx.world, B, device) if cfg.ptx_coef > 0 else None
    generator = torch.Generator().manual_seed(seed_of(ctx.seed, ctx.step, ctx.rank, 1))
    sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "entropy": 0.0, "ptx_loss": 0.0}
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(B, generator=generator).to(device).chunk(cfg.minibatches):
            mb_inputs = {k: v[mb] for k, v in inputs.items()}
            logits = engine("actor", **mb_inputs)
            logprobs = token_logprobs(logits, labels[mb])
            pl, clip_frac, approx_kl = policy_loss(logprobs, old_logprobs[mb], advantages[mb], mask[mb], cfg.clip_range)
            vl = value_loss(engine("critic", **mb_inputs), old_values[mb], returns[mb], mask[mb], cfg.value_clip)
            entropy = masked_mean(token_entropy(logits), mask[mb])
            loss = pl + cfg.vf_coef * vl - cfg.entropy_coef * entropy
            if ptx is not None:
                ptx_loss = model.actor(**{k: v[mb] for k, v in ptx.items()}).loss
                loss = loss + cfg.ptx_coef * ptx_loss
                sums["ptx_loss"] += float(ptx_loss.detach())
            engine.backward(loss)
            engine.step()
            for k, v in (("policy_loss", pl), ("value_loss", vl), ("clip_frac", clip_frac),
                         ("approx_kl", approx_kl), ("entropy", entropy)):
                sums[k] += float(v.detach())
            n_updates += 1
    t_train = time.time()

    kl_mean = float(_all_values(kl_per_row.float().mean().reshape(1)).mean())
    metrics = {k: v / n_updates for k, v in sums.items() if k != "ptx_loss" or ptx is not None}
    metrics.update({
        "loss": metrics["policy_loss"] + cfg.vf_coef * metrics["value_loss"],
        "reward_mean": float(raw.mean()), "reward_std": float(raw.std()) if B > 1 else 0.0,
        "kl": float(kl_per_row.mean()), "kl_coef": state["kl_coef"],
        "response_len": float(np.mean([len(r) for r in responses])),
        "generation_s": t_gen - t0, "scoring_s": t_score - t_gen, "training_s": t_train - t_score,
        "generation_share": (t_gen - t0) / max(t_train - t0, 1e-9),
    })
    if cfg.adaptive_kl:
        state["kl_coef"] = adaptive_kl_coef(state["kl_coef"], kl_mean, cfg.kl_target, cfg.kl_horizon, B * ctx.world)
    return metrics


def ppo_validation_step(engine, batch: dict, cfg: PPOConfig, tokenizer) -> dict:
    """Validation: greedy responses to held-out prompts, scored; loss = -mean score; the
    decoded prompts and responses as examples (logged by the engine as an artifact)."""
    model = engine.module
    prompts = prompts_of(batch)
    responses, stopped = generate(model.actor, prompts, tokenizer.special, cfg, len(tokenizer), seed=0, sample=False)
    rows = response_rows(prompts, responses, stopped, tokenizer.special, model.actor.config.uses_2d_positions,
                         cfg.max_new_tokens, batch["input_ids"].device)
    scores = score(model, rows, responses)
    inputs, labels = {k: rows[k] for k in INPUTS}, rows["labels"]
    mask = (labels != IGNORE_INDEX).float()
    with torch.no_grad():  # KL(actor || reference) on the greedy responses: how far training moved the policy
        kl = masked_mean(token_logprobs(model("actor", **inputs), labels)
                         - token_logprobs(model("reference", **inputs), labels), mask)
    samples = [{"prompt": tokenizer.decode(p[:-1]), "response": tokenizer.decode(r), "score": round(float(s), 4)}
               for p, r, s in zip(prompts, responses, scores)]
    return {"loss": -scores.mean(), "reward": scores.mean(), "kl": kl,
            "response_len": torch.tensor(float(np.mean([len(r) for r in responses]))), "samples": samples}
