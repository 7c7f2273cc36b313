"""Score a reward checkpoint (local directory or `models:/` / `runs:/` URI):

  python -m stages.rlhf.score pairs --reward-model RM --pairs FILE.jsonl
      accuracy (share of pairs with r_chosen > r_rejected) on preference pairs, per family
  python -m stages.rlhf.score responses --reward-model RM --policy POLICY --prompts FILE.jsonl [--samples N]
      mean / std reward of a policy's replies to prompts (greedy; or N seeded samples per prompt)

Progress goes to stderr; the last line of stdout is one JSON object:
  pairs:      {"accuracy": ..., "by_family": {family: accuracy}, "family_pairs": {family: n},
               "pairs": n, "rejected": {reason: n}}
  responses:  {"mean_reward": ..., "std_reward": ..., "prompts": n, "responses": n}

Pairs are rendered exactly as the reward stage renders them for training (`stages.rlhf.data.
pair_row`, in the chat format and with the max_len the reward checkpoint records), so the
scores are those the reward model gave during training. Pair rows: any shape the stage reads
(`prompt`, `conversation`, `instruction` with `chosen` and `rejected`); an optional `family`
field groups them (default: "real"). Prompt rows: `prompt`, `conversation`, `instruction`,
`query` (+ `history`) or OpenAI `messages` (a final assistant turn is dropped). Malformed rows
are counted per reason and skipped. The policy answers in its own checkpoint's chat format;
its replies are scored in the reward model's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter

import numpy as np
import torch

from stages.rlhf.steps import INPUTS, side_rewards


def rewards_of_rows(model, columns: dict[str, np.ndarray], segments: tuple[int, ...], batch_size: int = 16,
                    log=None) -> list[torch.Tensor]:
    """Rewards (N,) of each segment of N rows of the sample schema, in eval mode, no grad."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(columns["input_ids"])
    out: list[list[torch.Tensor]] = [[] for _ in segments]
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = {k: torch.as_tensor(np.asarray(columns[k][start:start + batch_size]), dtype=torch.long,
                                        device=device) for k in INPUTS}
            for scores, got in zip(out, side_rewards(model, batch, segments)):
                scores.append(got.float().cpu())
            if log:
                log(f"[score] {min(start + batch_size, n)}/{n} rows")
    model.train(was_training)
    return [torch.cat(s) if s else torch.zeros(0) for s in out]


def accuracy_report(chosen: torch.Tensor, rejected: torch.Tensor, families: list[str]) -> dict:
    """{"accuracy", "by_family": {family: accuracy}, "family_pairs": {family: n}, "pairs"}."""
    right = (chosen > rejected).tolist()
    by: dict[str, list[bool]] = {}
    for family, r in zip(families, right):
        by.setdefault(family, []).append(r)
    return {"accuracy": sum(right) / len(right) if right else float("nan"),
            "by_family": {f: sum(v) / len(v) for f, v in sorted(by.items())},
            "family_pairs": {f: len(v) for f, v in sorted(by.items())}, "pairs": len(right)}


def heldout_accuracy(model, data_uri: str, batch_size: int = 16) -> dict:
    """`accuracy_report` on every held-out row of a prepared pair output (the manifest's
    `validation_families` tag them)."""
    from stages.engine.data import ShardSource
    from stages.sft.data import MANIFEST
    from stages import storage

    fs, root = storage.resolve(data_uri)
    manifest = json.loads(storage.read_bytes(fs, f"{root}/{MANIFEST}"))
    source = ShardSource(data_uri, "validation")
    chosen, rejected = rewards_of_rows(model, source.columns, (1, 2), batch_size)
    return accuracy_report(chosen, rejected, manifest.get("validation_families") or ["all"] * source.size)


def effects_of(report: dict) -> dict:
    """A held-out accuracy report as flat effects: heldout_accuracy[.<family>], heldout_pairs[.<family>]."""
    return {"heldout_accuracy": report["accuracy"], "heldout_pairs": report["pairs"],
            **{f"heldout_accuracy.{f}": a for f, a in report["by_family"].items()},
            **{f"heldout_pairs.{f}": n for f, n in report["family_pairs"].items()}}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_reward(uri: str, device: str):
    """(model, tokenizer, chat format, max_len, min_chars) of a reward checkpoint: its recorded
    chat format and pair layout (max_len, min_chars; older checkpoints: half the context, 0)."""
    from glm.chat_format import from_metadata
    from glm.checkpoint import read_checkpoint_config
    from glm.value_head import load_reward_checkpoint
    from stages import storage

    path = storage.checkpoint(uri)
    config, metadata = read_checkpoint_config(path)
    model, tokenizer = load_reward_checkpoint(path, device=device)
    layout = metadata.get("pairs") or {}
    return (model, tokenizer, from_metadata(metadata, tokenizer), layout.get("max_len") or config.max_seq_len // 2,
            layout.get("min_chars", 0))


def _read_rows(path: str, parse, stats: Counter):
    """(row, parsed) of each JSONL line `parse` accepts; the others counted in stats by reason."""
    from stages import storage
    from stages.sft.data import read_jsonl_rows

    fs, paths = storage.expand(path)
    seen = {"rows_read": 0, "rejected": stats, "examples": []}
    for line, parsed in read_jsonl_rows(fs, paths, parse, seen):
        yield json.loads(line), parsed
    for example in seen["examples"]:
        _log(f"[score] skipped {example}")


def score_pairs(args) -> dict:
    from stages.rlhf.data import pair_row, parse_pair

    model, tokenizer, fmt, max_len, min_chars = load_reward(args.reward_model, args.device)
    use_2d = model.config.uses_2d_positions
    rows, families, rejected = [], [], Counter()
    for row, pair in _read_rows(args.pairs, parse_pair, rejected):
        rows.append(pair_row(pair, tokenizer, max_len, use_2d, fmt, min_chars)[0])
        families.append(str(row.get("family") or "real"))
    if not rows:
        raise ValueError(f"{args.pairs}: no usable pairs (skipped: {dict(rejected)})")
    _log(f"[score] {len(rows)} pairs ({sum(rejected.values())} skipped {dict(rejected) or ''}), max_len {max_len}")
    columns = {k: np.array([r[k] for r in rows]) for k in INPUTS}
    chosen, worse = rewards_of_rows(model, columns, (1, 2), args.batch_size, _log)
    return {**accuracy_report(chosen, worse, families), "rejected": dict(rejected)}


def score_responses(args) -> dict:
    import dataclasses

    from glm.chat_format import from_metadata
    from glm.checkpoint import load_inference_checkpoint, read_checkpoint_config
    from glm.generation import GenerationConfig, SpanQuery, generate_spans
    from glm.schema import pack_samples
    from stages import storage
    from stages.rlhf.data import fit_reply, parse_prompt, prompt_ids, reply_room, side_sample

    reward, rm_tokenizer, rm_fmt, max_len, min_chars = load_reward(args.reward_model, args.device)
    path = storage.checkpoint(args.policy)
    policy, tokenizer = load_inference_checkpoint(path, device=args.device)
    policy.eval()
    fmt = from_metadata(read_checkpoint_config(path)[1], tokenizer)
    skipped = Counter()
    prompts = [p for _, p in _read_rows(args.prompts, parse_prompt, skipped)]
    if not prompts:
        raise ValueError(f"{args.prompts}: no usable prompts (skipped: {dict(skipped)})")
    _log(f"[score] {len(prompts)} prompts ({sum(skipped.values())} skipped {dict(skipped) or ''}), "
         f"{'greedy' if not args.samples else f'{args.samples} samples each'}")
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=bool(args.samples),
                              temperature=args.temperature, top_p=args.top_p, stop_token_ids=fmt.stop_ids())
    room = policy.config.max_seq_len - args.max_new_tokens - 2
    if room <= 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room in the policy's context")
    queries = [SpanQuery(ids := fmt.prompt(p.messages())[-room:] + [tokenizer.special.gmask], len(ids) - 1, True)
               for p in prompts]
    rows = []
    for k in range(max(args.samples, 1)):
        sample_config = dataclasses.replace(config, seed=args.seed + k) if args.samples else config
        for start in range(0, len(prompts), args.batch_size):
            with torch.no_grad():
                spans = generate_spans(policy, queries[start:start + args.batch_size], tokenizer.special,
                                       sample_config, vocab_limit=len(tokenizer))
            for p, span in zip(prompts[start:start + args.batch_size], spans):
                text = fmt.parse_reply(tokenizer.decode(span)).content.strip()
                prompt = prompt_ids(p, rm_fmt)
                reply, _ = fit_reply(text, rm_fmt, reply_room(prompt, max_len), min_chars)
                side = side_sample(prompt, reply, rm_tokenizer, max_len, reward.config.uses_2d_positions)[0]
                rows.append(pack_samples([side], max_len, rm_tokenizer.special.pad))
                if len(rows) <= 3:
                    _log(f"[score] {p.query[:60]!r} -> {text[:120]!r}")
            _log(f"[score] generated {len(rows)}/{len(prompts) * max(args.samples, 1)} replies")
    columns = {c: np.array([r[c] for r in rows]) for c in INPUTS}
    [scores] = rewards_of_rows(reward, columns, (1,), args.batch_size)
    values = scores.tolist()
    return {"mean_reward": statistics.fmean(values), "std_reward": statistics.pstdev(values),
            "prompts": len(prompts), "responses": len(values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.rlhf.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--reward-model", required=True,
                        help="reward checkpoint: the reward stage's output directory or a models:/ or runs:/ URI")
    common.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p = sub.add_parser("pairs", parents=[common], help="pair accuracy, per family",
                       description="Share of pairs the reward model ranks right (r_chosen > r_rejected).")
    p.add_argument("--pairs", required=True, help="JSONL of preference pairs (path, glob or URI)")
    r = sub.add_parser("responses", parents=[common], help="reward of a policy's replies",
                       description="Generate replies of the policy to the prompts and score them with the reward model.")
    r.add_argument("--policy", required=True, help="policy inference checkpoint (directory or models:/ URI)")
    r.add_argument("--prompts", required=True, help="JSONL of prompts (path, glob or URI)")
    r.add_argument("--samples", type=int, default=0, help="sampled replies per prompt (0: one greedy reply)")
    r.add_argument("--seed", type=int, default=0, help="seed of sample k is seed + k")
    r.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --samples)")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --samples)")
    r.add_argument("--max-new-tokens", type=int, default=64, help="longest reply")
    args = parser.parse_args(argv)
    if args.command == "responses" and args.samples < 0:
        parser.error("--samples must be >= 0")
    try:
        result = score_pairs(args) if args.command == "pairs" else score_responses(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
