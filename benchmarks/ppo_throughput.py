"""PPO iteration throughput on the `small` preset, and rollout generation with the KV cache
and batching against generation without them, in the same run.

    python benchmarks/ppo_throughput.py [--preset small] [--prompts 8] [--new-tokens 32] [--iterations 2]

The PPO iteration is the stage's own `ppo_iteration` (actor, critic, frozen reference and a
reward model of the preset, prompts from the shipped preference slices in the ChatGLM
format) on a LocalEngine (the engine's optimizer without Ray / DeepSpeed); times are split
into generation / scoring / training; the first iteration is a warm-up. The rollout
comparison decodes the same prompts greedily for exactly --new-tokens tokens: batched with
the KV cache (`glm.generation.generate_spans`) vs one prompt at a time, re-running the whole
sequence for every token. Last line: JSON with generation_share, samples_per_s,
rollout_speedup (= cached / uncached tokens per second) and the goal (>= 3).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def uncached_generate(model, prompts: list[list[int]], special, new_tokens: int, vocab_limit: int) -> list[list[int]]:
    """Greedy decoding without KV cache and without batching: the whole sequence every token."""
    import torch

    from glm.schema import part_b_positions

    use_2d = model.config.uses_2d_positions
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for part_a in prompts:
            generated: list[int] = []
            for _ in range(new_tokens):
                tokens = part_a + [special.sop] + generated
                pos, block = part_b_positions(len(part_a) - 1, len(part_a), len(generated) + 1, is_gmask=True,
                                              use_2d=use_2d)
                n = len(tokens)
                logits = model(torch.tensor([tokens], device=device),
                               torch.tensor([list(range(len(part_a))) + pos], device=device),
                               torch.tensor([[0] * len(part_a) + block], device=device),
                               torch.ones(1, n, dtype=torch.long, device=device),
                               torch.tensor([[1] * len(part_a) + [0] * (n - len(part_a))], device=device)).logits
                logits = logits[0, -1].float()
                logits[vocab_limit:] = torch.finfo(logits.dtype).min
                logits[[special.eop, special.eos]] = torch.finfo(logits.dtype).min  # same as min_new_tokens
                generated.append(int(logits.argmax()))
            out.append(generated)
    return out


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def setup(preset_name: str, prompts: int, iterations: int, new_tokens: int, max_prompt_len: int, device,
          threads: int | None = None, log=print, tokenizer=None) -> dict:
    """Tokenizer (default: trained on the shipped preference slices), the PPO model of a preset
    (actor, critic, reference, reward) on `device`, a LocalEngine, the PPO config and prompt
    rows (prompts x iterations) from the shipped slices."""
    import torch

    from glm.config import padded_vocab_size, preset
    from glm.model import GLMModel
    from glm.tokenizer import train_tokenizer
    from glm.value_head import ScalarHeadModel
    from stages.engine.config import EngineConfig, OptimConfig
    from stages.engine.local import LocalEngine
    from stages.rlhf.config import PPOConfig
    from glm.chat_format import CHATGLM_6B, chat_format
    from stages.rlhf.data import parse_pair, prompt_ids, prompt_row
    from stages.rlhf.models import PPOModel

    if threads:
        torch.set_num_threads(threads)
    lines = [json.loads(l) for f in ("en_hh_rlhf_harmless_base", "zh_oasst1_pairs")
             for l in open(REPO / f"data/sample/preference/{f}.jsonl", encoding="utf-8")]
    if tokenizer is None:
        log(f"tokenizer from the preference slices ({len(lines)} rows) ...")
        tokenizer = train_tokenizer([l["chosen"] + "\n" + l["rejected"] for l in lines], vocab_size=4000,
                                    character_coverage=0.995)
    pairs = []
    for line in lines:
        try:
            pairs.append(parse_pair(line))
        except ValueError:
            continue
    config = preset(preset_name, vocab_size=padded_vocab_size(len(tokenizer)), hidden_dropout=0.0)
    torch.manual_seed(0)  # fresh weights: throughput does not depend on them
    with torch.device(device):  # built where it runs (a 350M model initialises in seconds on a GPU)
        model = PPOModel(GLMModel(config), ScalarHeadModel(GLMModel(config)), GLMModel(config),
                         ScalarHeadModel(GLMModel(config))).train()
    cfg = PPOConfig(max_new_tokens=new_tokens, ppo_epochs=1, minibatches=2)
    engine = LocalEngine(model, EngineConfig(train_steps=iterations, optim=OptimConfig(lr=1e-5, warmup_steps=1)),
                         steps_per_step=2)
    fmt = chat_format(CHATGLM_6B, tokenizer)
    rows = [prompt_row(prompt_ids(p, fmt), tokenizer, max_prompt_len) for p in pairs[:prompts * iterations]]
    return {"tokenizer": tokenizer, "model": model, "engine": engine, "cfg": cfg, "rows": rows, "device": device,
            "prompts": prompts, "new_tokens": new_tokens,
            "parameters_per_model": sum(p.numel() for p in model.actor.parameters())}


def run_iterations(s: dict, iterations: int, log=print) -> dict:
    """`iterations` calls of the stage's ppo_iteration; the first is a warm-up (unless alone).
    Returns mean seconds per iteration and its generation / scoring / training split."""
    import torch

    from stages.engine.loop import IterationContext
    from stages.rlhf.ppo import ppo_iteration

    tokenizer, rows, n, device = s["tokenizer"], s["rows"], s["prompts"], s["device"]
    state, timed = {}, []
    for it in range(iterations):
        chunk = rows[it * n:(it + 1) * n]
        batch = {k: torch.tensor([r[k] for r in chunk], device=device) for k in chunk[0]}
        sync(device)
        t = time.perf_counter()
        m = ppo_iteration(s["engine"], batch, IterationContext(step=it, rank=0, world=1, seed=0, state=state), s["cfg"],
                          tokenizer.special, len(tokenizer))
        sync(device)
        m["seconds"] = time.perf_counter() - t
        log(f"  iteration {it}: {m['seconds']:.2f}s (generation {m['generation_s']:.2f}s, scoring "
            f"{m['scoring_s']:.2f}s, training {m['training_s']:.2f}s), reward {m['reward_mean']:.3f}")
        if it > 0 or iterations == 1:
            timed.append(m)
    seconds = sum(m["seconds"] for m in timed)
    split = {k: sum(m[k] for m in timed) for k in ("generation_s", "scoring_s", "training_s")}
    return {"iteration_s": round(seconds / len(timed), 3), **{k: round(v / len(timed), 3) for k, v in split.items()},
            "generation_share": round(split["generation_s"] / seconds, 3),
            "samples_per_s": round(n * len(timed) / seconds, 3)}


def rollout_comparison(s: dict, log=print) -> dict:
    """Greedy rollouts of the same prompts: batched with the KV cache against one prompt at a
    time without it (exactly new_tokens tokens each)."""
    import torch

    from glm.generation import GenerationConfig, SpanQuery, generate_spans
    from stages.rlhf.ppo import prompts_of

    tokenizer, rows, n, new_tokens, device = s["tokenizer"], s["rows"], s["prompts"], s["new_tokens"], s["device"]
    prompts = prompts_of({k: torch.tensor([r[k] for r in rows[:n]]) for k in ("input_ids", "segment_ids")})
    actor = s["model"].actor.eval()
    greedy = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    log("rollout: batched with the KV cache ...")
    sync(device)
    t = time.perf_counter()
    cached = generate_spans(actor, [SpanQuery(p, len(p) - 1, True) for p in prompts], tokenizer.special, greedy,
                            vocab_limit=len(tokenizer))
    sync(device)
    cached_s = time.perf_counter() - t
    log(f"  {cached_s:.2f}s; one prompt at a time, no cache ...")
    t = time.perf_counter()
    plain = uncached_generate(actor, prompts, tokenizer.special, new_tokens, len(tokenizer))
    plain_s = time.perf_counter() - t
    tokens = len(prompts) * new_tokens
    same = sum(a == b for a, b in zip(cached, plain)) / len(prompts)
    log(f"  {plain_s:.2f}s; identical greedy outputs for {same:.0%} of prompts")
    return {"rollout_tokens_per_s": round(tokens / cached_s, 1), "baseline_rollout_tokens_per_s": round(tokens / plain_s, 1),
            "rollout_speedup": round(plain_s / cached_s, 2), "same_greedy_outputs": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per PPO iteration (one worker)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=2, help="PPO iterations; the first is a warm-up")
    parser.add_argument("--max-prompt-len", type=int, default=64)
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    args = parser.parse_args()

    import torch

    threads = os.cpu_count() or 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    log = functools.partial(print, flush=True)
    s = setup(args.preset, args.prompts, args.iterations, args.new_tokens, args.max_prompt_len, device, threads, log)
    log(f"PPO on {args.preset} ({s['parameters_per_model'] / 1e6:.1f}M parameters per model), "
        f"{args.prompts} prompts x {args.new_tokens} new tokens, {threads} threads, {device} ...")
    ppo = run_iterations(s, args.iterations, log)
    rollout = rollout_comparison(s, log)
    print(json.dumps({
        "benchmark": "ppo_throughput", "preset": args.preset, "device": device, "threads": threads,
        "prompts": args.prompts, "new_tokens": args.new_tokens, **ppo, **rollout, "goal": 3.0,
    }))


if __name__ == "__main__":
    main()
