"""The pipeline's account of what each stage did, and its final answer check.

`summary` reads every stage's effects (`stages.effects`: a JSON file beside each output) and
prints one line per stage: pretraining's validation perplexity against the count-model
baselines, SFT's held-out loss before / after with its sample answers, the reward model's
held-out pair accuracy, PPO's validation reward before / after with the KL to the reference,
and the quantization gate's perplexity on text the model did not train on. The numbers are
logged on the pipeline's MLflow run as `<stage>.<measure>`.

`check_answers` fails the pipeline loudly when a final answer is empty, one token repeated, or
not in the language of its prompt.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from stages.effects import read_effects
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
        return f"held-out SFT loss {f('val_loss_before')} -> {f('val_loss_after')}"
    if kind == "reward":
        families = ", ".join(f"{k.split('.', 1)[1]} {f(k, '.3f')}" for k in e if k.startswith("heldout_accuracy."))
        return (f"held-out pair accuracy {f('val_accuracy_before', '.3f')} -> {f('val_accuracy_after', '.3f')} "
                f"(loss {f('val_loss_before')} -> {f('val_loss_after')})"
                + (f"; all {f('heldout_pairs', 'd')} held-out pairs: {families}" if families else ""))
    if kind == "dpo":
        return f"held-out reward accuracy {f('val_reward_accuracy_before', '.3f')} -> {f('val_reward_accuracy_after', '.3f')}"
    if kind == "ppo":
        return (f"validation reward {f('val_reward_before')} -> {f('val_reward_after')}, "
                f"KL to the reference {f('val_kl_after')}")
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


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_UNITS = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+|[^\w\s]")
"""Without a tokenizer: each CJK character, each other word, each punctuation mark."""


def language(text: str) -> str | None:
    """'zh' or 'en' by which script has more characters (None: neither appears)."""
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    if not cjk and not latin:
        return None
    return "zh" if cjk * 3 >= latin else "en"  # a CJK character carries about a word's worth


def answer_problems(prompt: str, answer: str, tokenize=None) -> list[str]:
    """Why an answer is noise: empty, one token repeated, or not in the prompt's language."""
    text = answer.strip()
    if not text:
        return ["the answer is empty"]
    problems = []
    units = tokenize(text) if tokenize else _UNITS.findall(text)
    if len(set(units)) <= 1:
        problems.append(f"the answer is one token repeated ({len(units)} x {text[:8]!r})")
    want, got = language(prompt.replace("[MASK]", "").replace("[gMASK]", "")), language(text)
    if want and got != want:
        problems.append(f"the answer is not in the prompt's language ({want}): detected {got or 'no letters'}")
    return problems


def check_answers(answers: dict[str, str], tokenizer=None) -> None:
    """Raise RuntimeError naming every bad answer (keys are 'chat: PROMPT' / 'fill: PROMPT')."""
    bad = []
    for request, answer in answers.items():
        prompt = request.split(": ", 1)[-1]
        for problem in answer_problems(prompt, answer, tokenizer.encode if tokenizer is not None else None):
            bad.append(f"{request!r} -> {answer!r}: {problem}")
    if bad:
        raise RuntimeError("final check failed, the model's answers are noise:\n  " + "\n  ".join(bad))
    print("== final check passed: every answer is non-empty, varied and in its prompt's language", flush=True)


def tokenizer_of(model_uri: str):
    """The tokenizer shipped with an inference checkpoint (None when it cannot be read)."""
    try:
        from stages.sft.stage import base_tokenizer

        return base_tokenizer(model_uri)
    except (FileNotFoundError, OSError):
        return None
