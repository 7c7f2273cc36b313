"""PPO, GRPO and RLOO on the training engine: one engine step = one iteration on every worker.

    rollout   the actor samples responses to the prompts of the worker's batch (one per prompt
              for PPO, a group of samples_per_prompt for GRPO / RLOO; batched, KV cache, the
              chat format's stop tokens, a sampling seed derived from (seed, step, rank): a
              resumed run draws the same responses), at `temperature` without top-k / top-p,
              so the scored distribution is the sampled one
    scoring   actor and reference log-probs (at that temperature), the sequence reward (reward
              model or token rule, plus weighted rule rewards: stages/rlhf/rules.py); PPO: critic
              values, per-token KL penalty, GAE (a response cut at max_new_tokens bootstraps
              from the critic), whitened advantages; GRPO / RLOO: group baselines
    training  ppo_epochs x minibatches optimizer steps on the clipped policy loss (PPO: + vf_coef
              x the clipped value loss, actor and critic gradients clipped separately; GRPO:
              + the k3 KL term) - entropy bonus (+ PPO-ptx), via engine.backward/step

PPO's KL coefficient and running reward moments live in the engine-checkpointed stage state;
they are updated from all-rank statistics so every rank holds the same state.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from glm.generation import GenerationConfig, SpanQuery, generate_spans_with_stops
from glm.schema import SpecialTokens, layout_prompted, pack_samples
from glm.value_head import last_token_index
from stages.rlhf.config import PPOConfig, RewardsConfig
from stages.rlhf.losses import (
    IGNORE_INDEX, adaptive_kl_coef, gae, group_advantages, k3_kl, kl_penalty_rewards, masked_mean, masked_whiten,
    moments_std, policy_loss, token_entropy, token_logprobs, update_moments, value_loss,
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
             seed: int, sample: bool = True, stop_ids: Sequence[int] = ()) -> tuple[list[list[int]], list[int | None]]:
    """Sampled (at cfg.temperature, the distribution token_logprobs scores) or greedy responses,
    and the stop token that ended each (None: cut at max_new_tokens). `stop_ids`: the chat
    format's stop tokens beside [eop] and end-of-text (its other roles' tokens), as in chat and serving."""
    config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=sample, temperature=cfg.temperature,
                              seed=seed, stop_token_ids=list(stop_ids))
    queries = [SpanQuery(p, len(p) - 1, True) for p in prompts]
    was_training = actor.training
    actor.eval()
    spans, stops = generate_spans_with_stops(actor, queries, special, config, vocab_limit=vocab_limit)
    actor.train(was_training)
    return spans, stops


def response_rows(prompts: list[list[int]], responses: list[list[int]], stops: list[int | None],
                  special: SpecialTokens, use_2d: bool, max_new_tokens: int, device) -> dict[str, torch.Tensor]:
    """Prompt + [gMASK] [sop] response rows (the reward model's training layout). Labels are
    the actions: the response tokens, then the stop token the actor took (a stop is an action
    too); a response cut at max_new_tokens has no final label."""
    seq_len = max(len(p) for p in prompts) + 1 + max_new_tokens
    rows = []
    for prompt, response, stop in zip(prompts, responses, stops):
        sample = layout_prompted(prompt[:-1], response, special, use_2d=use_2d, mask_token=special.gmask)
        sample.labels[-1] = IGNORE_INDEX if stop is None else stop
        rows.append(pack_samples([sample], seq_len, special.pad))
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long, device=device) for k in rows[0]}


@torch.no_grad()
def score(model, rows: dict, prompts: list[list[int]], responses: list[list[int]], stops: list[int | None],
          rewards: RewardsConfig, tokenizer=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(B,) sequence rewards: rewards.model x the model reward (the reward model's value at the
    response's last token, or the token rule) + the weighted rule rewards; and each part (B,)."""
    from stages.rlhf.models import RuleReward
    from stages.rlhf.rules import combine, rule_scores

    device = rows["input_ids"].device
    if model.reward is None or rewards.model == 0:
        modelled = torch.zeros(len(responses), device=device)
    elif isinstance(model.reward, RuleReward):
        modelled = model.reward.score(responses).to(device)
    else:
        values = model("reward", **{k: rows[k] for k in INPUTS})
        modelled = values[torch.arange(values.shape[0]), last_token_index(rows["segment_ids"], 1)].float()
    decoded = "language" in rewards.rules
    rules = rule_scores(rewards, [tokenizer.decode(p[:-1]) for p in prompts] if decoded else [],
                        [tokenizer.decode(r) for r in responses] if decoded else [], responses,
                        [s is not None for s in stops])
    total = torch.tensor(combine(rewards, modelled.tolist(), rules), device=device)
    parts = {"model": modelled, **{k: torch.tensor(v, device=device) for k, v in rules.items()}}
    return total, parts


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


def clip_grad_groups(groups: dict[str, list[torch.nn.Parameter]], max_norm: float) -> dict[str, float]:
    """Clip each group's gradient (e.g. actor, critic) by its own global norm, in place, after
    engine.backward and before engine.step (the engine's own clip off: TrainSpec.clips_gradients);
    returns each group's norm before clipping. A parameter's gradient is its `.grad` (whole and
    already averaged over ranks: LocalEngine, ZeRO-0), or under ZeRO-1/2 the fragment of the
    averaged gradient this rank holds (squares summed over ranks)."""
    import torch.distributed as dist

    names = list(groups)
    whole, parted = [[] for _ in names], [[] for _ in names]
    for i, name in enumerate(names):
        for p in groups[name]:
            if p.grad is not None:
                whole[i].append(p.grad)
            elif getattr(p, "_hp_mapping", None) is not None:  # DeepSpeed ZeRO-1/2
                fragment = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
                address = p._hp_mapping.lp_fragment_address
                if fragment.numel() == p.numel() != address.numel:  # a full buffer: this rank's share of it
                    fragment = fragment.view(-1).narrow(0, address.start, address.numel)
                parted[i].append(fragment)

    device = next((g.device for gs in whole + parted for g in gs), torch.device("cpu"))

    def squares(grads: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.stack([sum((g.float().pow(2).sum() for g in gs), torch.zeros((), device=device)) for gs in grads])

    partial = squares(parted)
    partitioned = any(hasattr(p, "_hp_mapping") for params in groups.values() for p in params)  # alike on every rank
    if partitioned and dist.is_available() and dist.is_initialized():
        dist.all_reduce(partial)
    norms = (squares(whole) + partial).sqrt()
    for i, norm in enumerate(norms.tolist()):
        factor = max_norm / (norm + 1e-6)
        if max_norm > 0 and factor < 1.0:
            for g in whole[i] + parted[i]:
                g.mul_(factor)
    return dict(zip(names, norms.tolist()))


def _rollout(model, prompts: list[list[int]], ctx, cfg: PPOConfig, special: SpecialTokens, vocab_limit: int,
             rewards: RewardsConfig, tokenizer, stop_ids: Sequence[int], device) -> dict:
    """Sample one response per prompt row and score it: rows, labels, action mask, behaviour and
    reference log-probs (at cfg.temperature), sequence rewards and their parts."""
    t0 = time.time()
    responses, stops = generate(model.actor, prompts, special, cfg, vocab_limit, seed_of(ctx.seed, ctx.step, ctx.rank),
                                stop_ids=stop_ids)
    t_gen = time.time()
    rows = response_rows(prompts, responses, stops, special, model.actor.config.uses_2d_positions,
                         cfg.max_new_tokens, device)
    inputs, labels = {k: rows[k] for k in INPUTS}, rows["labels"]
    with torch.no_grad():
        old_logprobs = token_logprobs(model("actor", **inputs), labels, cfg.temperature)
        ref_logprobs = token_logprobs(model("reference", **inputs), labels, cfg.temperature)
        raw, parts = score(model, rows, prompts, responses, stops, rewards, tokenizer)
    return {"responses": responses, "stopped": torch.tensor([s is not None for s in stops], device=device),
            "rows": rows, "inputs": inputs, "labels": labels, "mask": (labels != IGNORE_INDEX).float(),
            "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "raw": raw, "parts": parts,
            "t0": t0, "t_gen": t_gen}


def _optimise(engine, n_rows: int, ctx, cfg: PPOConfig, device, loss_fn, clip=None) -> tuple[dict, float]:
    """ppo_epochs x minibatches optimizer steps over the rollout rows (a seeded permutation per
    epoch); loss_fn(minibatch indices) -> (loss, {name: scalar tensor}); clip() between backward
    and step. Returns the metrics averaged over the steps, and the time it took."""
    t = time.time()
    generator = torch.Generator().manual_seed(seed_of(ctx.seed, ctx.step, ctx.rank, 1))
    sums: dict[str, float] = {}
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(n_rows, generator=generator).to(device).chunk(cfg.minibatches):
            loss, metrics = loss_fn(mb)
            engine.backward(loss)
            metrics.update(clip() if clip is not None else {})
            engine.step()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_updates += 1
    return {k: v / n_updates for k, v in sums.items()}, time.time() - t


def _rollout_metrics(r: dict, t_score: float, t_train: float) -> dict:
    raw, parts = r["raw"], r["parts"]
    out = {"reward_mean": float(raw.mean()), "reward_std": float(raw.std()) if len(raw) > 1 else 0.0,
           "truncated": float(1.0 - r["stopped"].float().mean()),
           "response_len": float(np.mean([len(x) for x in r["responses"]])),
           "generation_s": r["t_gen"] - r["t0"], "scoring_s": t_score - r["t_gen"], "training_s": t_train,
           "generation_share": (r["t_gen"] - r["t0"]) / max(t_score + t_train - r["t0"], 1e-9)}
    if len(parts) > 1:  # rule rewards in use: each part's mean
        out.update({f"reward_{k}": float(v.float().mean()) for k, v in parts.items()})
    return out


def ppo_iteration(engine, batch: dict, ctx, cfg: PPOConfig, special: SpecialTokens, vocab_limit: int,
                  rewards: RewardsConfig | None = None, tokenizer=None, stop_ids: Sequence[int] = (),
                  grad_clip: float = 1.0) -> dict:
    """One PPO iteration (the engine's iteration_fn); returns this rank's metrics. A response cut
    at max_new_tokens has not ended: it gets no sequence score, and GAE bootstraps its return
    from the critic's value at the cut (cfg.truncated "bootstrap"; "score": scored as ended).
    Actor and critic gradients are clipped separately to grad_clip (the engine's clip is off:
    TrainSpec.clips_gradients)."""
    model = engine.module
    state = ctx.state
    state.setdefault("kl_coef", cfg.kl_coef)
    device = batch["input_ids"].device
    r = _rollout(model, prompts_of(batch), ctx, cfg, special, vocab_limit, rewards or RewardsConfig(), tokenizer,
                 stop_ids, device)
    inputs, labels, mask = r["inputs"], r["labels"], r["mask"]
    old_logprobs, ref_logprobs, raw, stopped = r["old_logprobs"], r["ref_logprobs"], r["raw"], r["stopped"]
    with torch.no_grad():
        values = model("critic", **inputs)
        old_values = values * mask
        last = last_token_index(r["rows"]["segment_ids"], 1)  # the cut response's next state
        ended = stopped if cfg.truncated == "bootstrap" else torch.ones_like(stopped)
        bootstrap = values[torch.arange(len(last), device=device), last] * (~ended)
        everyone = _all_values(raw.float())
        state["moments"] = update_moments(state.get("moments", {}), everyone.tolist())
        scores = raw
        if cfg.normalize_reward:
            scores = (raw - state["moments"]["mean"]) / max(moments_std(state["moments"]), 1e-6)
            if cfg.reward_clip:
                scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        scores = scores * ended  # only a response that ended has its score
        kl_per_row = ((old_logprobs - ref_logprobs) * mask).sum(-1)
        token_rewards = kl_penalty_rewards(old_logprobs, ref_logprobs, scores, mask, state["kl_coef"])
        advantages, returns = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam, bootstrap=bootstrap)
        advantages = masked_whiten(advantages, mask)
    t_score = time.time()

    B = len(r["responses"])
    ptx = _ptx_rows(cfg.ptx_data, ctx.step, ctx.rank, ctx.world, B, device) if cfg.ptx_coef > 0 else None

    def loss_fn(mb):
        mb_inputs = {k: v[mb] for k, v in inputs.items()}
        logits = engine("actor", **mb_inputs)
        logprobs = token_logprobs(logits, labels[mb], cfg.temperature)
        pl, clip_frac, approx_kl = policy_loss(logprobs, old_logprobs[mb], advantages[mb], mask[mb], cfg.clip_range)
        vl = value_loss(engine("critic", **mb_inputs), old_values[mb], returns[mb], mask[mb], cfg.value_clip)
        with torch.set_grad_enabled(cfg.entropy_coef != 0):  # a metric only: no (B, T, V) buffers kept for it
            entropy = masked_mean(token_entropy(logits, cfg.temperature), mask[mb])
        loss = pl + cfg.vf_coef * vl - cfg.entropy_coef * entropy
        metrics = {"policy_loss": pl, "value_loss": vl, "clip_frac": clip_frac, "approx_kl": approx_kl,
                   "entropy": entropy}
        if ptx is not None:
            metrics["ptx_loss"] = model.actor(**{k: v[mb] for k, v in ptx.items()}).loss
            loss = loss + cfg.ptx_coef * metrics["ptx_loss"]
        return loss, {k: v.detach() for k, v in metrics.items()}

    def clip():
        return {f"{k}_grad_norm": v for k, v in clip_grad_groups(model.clip_groups(), grad_clip).items()}

    metrics, t_train = _optimise(engine, B, ctx, cfg, device, loss_fn, clip)
    kl_mean = float(_all_values(kl_per_row.float().mean().reshape(1)).mean())
    metrics.update(_rollout_metrics(r, t_score, t_train))
    metrics.update({"loss": metrics["policy_loss"] + cfg.vf_coef * metrics["value_loss"],
                    "kl": float(kl_per_row.mean()), "kl_coef": state["kl_coef"]})
    if cfg.adaptive_kl:
        state["kl_coef"] = adaptive_kl_coef(state["kl_coef"], kl_mean, cfg.kl_target, cfg.kl_horizon, B * ctx.world)
    return metrics


def group_iteration(engine, batch: dict, ctx, cfg: PPOConfig, special: SpecialTokens, vocab_limit: int,
                    mode: str, rewards: RewardsConfig | None = None, tokenizer=None,
                    stop_ids: Sequence[int] = ()) -> dict:
    """One GRPO or RLOO iteration (the engine's iteration_fn; no critic, stateless: exact on
    resume through the seeds alone). Each prompt row is sampled samples_per_prompt = k times on
    this rank (a group); sequence advantages come from the group's rewards before any
    minibatching (`group_advantages`), broadcast to the response's tokens, never whitened again.

        grpo  reward = score, A = (r - group mean) / group std; loss = clipped surrogate
              + kl_coef x k3 KL to the reference per token (DeepSeekMath)
        rloo  reward = score - kl_coef x summed KL to the reference, A = r - mean of the other
              k - 1 (Ahmadian et al. 2024); loss = clipped surrogate
    """
    model = engine.module
    k = cfg.samples_per_prompt
    prompts = [p for p in prompts_of(batch) for _ in range(k)]  # consecutive groups of k
    r = _rollout(model, prompts, ctx, cfg, special, vocab_limit, rewards or RewardsConfig(), tokenizer, stop_ids,
                 batch["input_ids"].device)
    labels, mask = r["labels"], r["mask"]
    old_logprobs, ref_logprobs = r["old_logprobs"], r["ref_logprobs"]
    kl_per_row = ((old_logprobs - ref_logprobs) * mask).sum(-1)
    sequence_reward = r["raw"] - cfg.kl_coef * kl_per_row if mode == "rloo" else r["raw"]
    advantages = group_advantages(sequence_reward, k, mode)[:, None] * mask
    t_score = time.time()

    def loss_fn(mb):
        logits = engine("actor", **{key: v[mb] for key, v in r["inputs"].items()})
        logprobs = token_logprobs(logits, labels[mb], cfg.temperature)
        pl, clip_frac, approx_kl = policy_loss(logprobs, old_logprobs[mb], advantages[mb], mask[mb], cfg.clip_range)
        loss = pl
        metrics = {"policy_loss": pl, "clip_frac": clip_frac, "approx_kl": approx_kl}
        if mode == "grpo":
            metrics["kl_loss"] = masked_mean(k3_kl(logprobs, ref_logprobs[mb]), mask[mb])
            loss = loss + cfg.kl_coef * metrics["kl_loss"]
        if cfg.entropy_coef:
            metrics["entropy"] = masked_mean(token_entropy(logits, cfg.temperature), mask[mb])
            loss = loss - cfg.entropy_coef * metrics["entropy"]
        return loss, {key: v.detach() for key, v in metrics.items()}

    metrics, t_train = _optimise(engine, len(prompts), ctx, cfg, batch["input_ids"].device, loss_fn)
    metrics.update(_rollout_metrics(r, t_score, t_train))
    groups = r["raw"].float().reshape(-1, k)
    metrics.update({"loss": metrics["policy_loss"] + (cfg.kl_coef * metrics["kl_loss"] if mode == "grpo" else 0.0),
                    "kl": float(kl_per_row.mean()), "group_reward_std": float(groups.std(dim=1).mean()),
                    "flat_groups": float((groups.std(dim=1) == 0).float().mean())})
    return metrics


VALIDATION_SEED = 20240601  # the same seeded samples at every validation (and on resume)


def ppo_validation_step(engine, batch: dict, cfg: PPOConfig, tokenizer, rewards: RewardsConfig | None = None,
                        stop_ids: Sequence[int] = ()) -> dict:
    """Validation of ppo / grpo / rloo on held-out prompts: validation_samples seeded samples
    per prompt (the same seeds every time, at the training temperature) and the greedy answer,
    scored. reward / reward_std: mean and std of the samples' rewards (loss = -reward);
    greedy_reward: the greedy answers'; kl: KL per token to the reference on the samples;
    truncated: share of samples cut at max_new_tokens; samples: the decoded answers (an artifact)."""
    model, special = engine.module, tokenizer.special
    rewards = rewards or RewardsConfig()
    device = batch["input_ids"].device
    prompts = prompts_of(batch)
    greedy, greedy_stops = generate(model.actor, prompts, special, cfg, len(tokenizer), seed=0, sample=False,
                                    stop_ids=stop_ids)
    rows = response_rows(prompts, greedy, greedy_stops, special, model.actor.config.uses_2d_positions,
                         cfg.max_new_tokens, device)
    greedy_scores, _ = score(model, rows, prompts, greedy, greedy_stops, rewards, tokenizer)
    out = {"greedy_reward": greedy_scores.mean()}
    n = cfg.validation_samples
    items = [{"prompt": tokenizer.decode(p[:-1]), "response": tokenizer.decode(g), "score": round(float(s), 4)}
             for p, g, s in zip(prompts, greedy, greedy_scores)]
    if n:
        many = [p for p in prompts for _ in range(n)]
        sampled, stops = generate(model.actor, many, special, cfg, len(tokenizer), seed_of(VALIDATION_SEED),
                                  stop_ids=stop_ids)
        rows = response_rows(many, sampled, stops, special, model.actor.config.uses_2d_positions,
                             cfg.max_new_tokens, device)
        scores, _ = score(model, rows, many, sampled, stops, rewards, tokenizer)
        inputs, labels = {k: rows[k] for k in INPUTS}, rows["labels"]
        with torch.no_grad():
            kl = masked_mean(token_logprobs(model("actor", **inputs), labels, cfg.temperature)
                             - token_logprobs(model("reference", **inputs), labels, cfg.temperature),
                             (labels != IGNORE_INDEX).float())
        out.update({"reward": scores.mean(), "reward_std": scores.std() if len(scores) > 1 else torch.tensor(0.0),
                    "kl": kl, "truncated": torch.tensor(float(np.mean([s is None for s in stops]))),
                    "response_len": torch.tensor(float(np.mean([len(x) for x in sampled])))})
        for i, item in enumerate(items):
            item["samples"] = [{"response": tokenizer.decode(sampled[j]), "score": round(float(scores[j]), 4)}
                               for j in range(i * n, (i + 1) * n)]
    else:
        out.update({"reward": out["greedy_reward"],
                    "response_len": torch.tensor(float(np.mean([len(x) for x in greedy])))})
    out.update({"loss": -out["reward"], "samples": items})
    return out
