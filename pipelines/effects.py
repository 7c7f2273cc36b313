"""The pipeline's account of what each stage did, and its final answer check.

`summary` reads every stage's effects (`stages.effects`: a JSON file beside each output) and
prints one line per stage: pretraining's validation perplexity against the count-model
baselines, SFT's held-out loss before / after with its sample answers, the reward model's
held-out pair accuracy, PPO's validation reward before / after with the KL to the reference,
and the quantization gate's perplexity on text the model did not train on. The numbers are
logged on the pipeline's MLflow run as `<stage>.<measure>`.

`check_answers` fails the pipeline loudly when a final answer is noise (`answer_problems`: empty,
no words, mostly punctuation, broken characters, a degenerate loop, or not in the language of
its prompt); the driver runs it before the model is registered.
"""

from __future__ import annotations

import sys
from typing import Any

from stages.effects import answer_problems, read_effects
from stages.tracking import log_json

CHECK_SEED = 0


def check_decoding() -> dict[str, Any]:
    """Request fields of the check requests: decoded like a chat client would (ChatGLM's
    defaults, `glm.generation.CHAT_DEFAULTS`), with a fixed seed."""
    from glm.generation import CHAT_DEFAULTS

    return {"temperature": CHAT_DEFAULTS["temperature"], "top_p": CHAT_DEFAULTS["top_p"],
            "no_repeat_ngram_size": CHAT_DEFAULTS["no_repeat_ngram_size"], "seed": CHECK_SEED}


def _models(outputs: dict[str, dict[str, str]]) -> list[tuple[str, str]]:
    """(label, output URI) of every output that may carry effects, in pipeline order."""
    order = [("pretrain", "model"), ("sft", "model"), ("rlhf", "reward_model"), ("rlhf", "model"), ("quantize", "model")]
    return [(f"{stage}:{key}" if key != "model" else stage, outputs[stage][key])
            for stage, key in order if key in outputs.get(stage, {})]


def _line(stage: str, e: dict[str, Any]) -> str:
    def f(key: str, fmt: str = ".4g") -> str:
        return format(e[key], fmt) if isinstance(e.get(key), (int, float)) else "-"

    kind = e.get("stage", stage)
    if kind == "pretrain":
        return (f"validation perplexity {f('val_ppl', '.1f')} over {f('val_tokens', 'd')} predicted tokens; "
                f"unigram {f('baseline_unigram_ppl', '.1f')} ({f('val_ppl_over_unigram', '.3f')}x), "
                f"bigram {f('baseline_bigram_ppl', '.1f')} ({f('val_ppl_over_bigram', '.3f')}x)")
    if kind == "sft":
        line = f"held-out SFT loss {f('val_loss_before')} -> {f('val_loss_after')}"
        if isinstance(e.get("val_loss_before"), (int, float)) and isinstance(e.get("val_loss_after"), (int, float)):
            line += f" ({e['val_loss_after'] / e['val_loss_before'] - 1:+.1%})"
        if "chat_prompts" in e:
            line += (f"; greedy answers to {e['chat_prompts']} held-out prompts: {f('chat_language_rate', '.0%')} in "
                     f"the prompt's language, {f('chat_ended_rate', '.0%')} ended within {e['chat_max_new_tokens']} "
                     f"tokens, {f('chat_sensible_rate', '.0%')} not noise (all three {f('chat_good_rate', '.0%')})")
        return line
    if kind == "reward":
        line = (f"held-out pair accuracy {f('val_accuracy_before', '.3f')} -> {f('val_accuracy_after', '.3f')} "
                f"(loss {f('val_loss_before')} -> {f('val_loss_after')})")
        families = sorted(k.split(".", 1)[1] for k in e if k.startswith("heldout_accuracy."))
        if families:  # the exported model on every held-out pair, per family (stages.rlhf.score)
            line += "; by family: " + ", ".join(
                f"{name} {e[f'heldout_accuracy.{name}']:.3f} ({e.get(f'heldout_pairs.{name}', '?')} pairs)" for name in families)
        return line
    if kind == "dpo":
        return f"held-out reward accuracy {f('val_reward_accuracy_before', '.3f')} -> {f('val_reward_accuracy_after', '.3f')}"
    if kind in ("ppo", "grpo", "rloo"):
        return (f"validation reward {f('val_reward_before')} -> {f('val_reward_after')} (std "
                f"{f('val_reward_std_after')}), greedy {f('val_greedy_reward_before')} -> "
                f"{f('val_greedy_reward_after')}, KL to the reference {f('val_kl_after')}")
    if kind == "quantize":
        return (f"perplexity on held-out text ({e.get('gate_text')}, {f('gate_tokens', 'd')} tokens): fp "
                f"{f('ppl_fp', '.2f')}, int8 {f('ppl_int8', '.2f')}, int4 {f('ppl_int4', '.2f')} "
                f"({f('ppl_increase', '+.2%')}, gate {'passed' if e.get('gate_passed') else 'FAILED'})")
    return str(e)


def summary(outputs: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Print each stage's effect; log the numbers on the active MLflow run (the pipeline's)."""
    found = {label: e for label, uri in _models(outputs) if (e := read_effects(uri)) is not None}
    if not found:
        return {}
    print("== what each stage did", flush=True)
    for label, e in found.items():
        print(f"  {label:16s} {_line(label, e)}", flush=True)
        for s in e.get("samples", []):
            print(f"  {'':16s}   {s.get('prompt')!r} -> {s.get('response')!r}", flush=True)
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.log_metrics({f"{label.replace(':', '.')}.{k}": float(v) for label, e in found.items()
                            for k, v in e.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        log_json(mlflow, found, "effects.json")
    return found


def check_answers(answers: dict[str, str], tokenizer=None) -> None:
    """Raise RuntimeError naming every bad answer (keys are 'chat: PROMPT' / 'fill: PROMPT')."""
    bad = []
    for request, answer in answers.items():
        prompt = request.split(": ", 1)[-1]
        for problem in answer_problems(prompt, answer, tokenizer.encode if tokenizer is not None else None):
            bad.append(f"{request!r} -> {answer!r}: {problem}")
    if bad:
        raise RuntimeError("final check failed, the model's answers are noise:\n  " + "\n  ".join(bad))
    print("== final check passed: every answer has words, no loop, no broken characters, and is in its prompt's language",
          flush=True)


def tokenizer_of(model_uri: str):
    """The tokenizer shipped with an inference checkpoint (None when it cannot be read)."""
    try:
        from stages.sft.stage import base_tokenizer

        return base_tokenizer(model_uri)
    except (FileNotFoundError, OSError):
        return None
