"""What each stage did, measured: a small JSON file beside a stage's output
(`<output>_effects.json`), its numbers also logged as `effect.*` metrics of the stage's MLflow
run. The pipeline prints them in its summary (`pipelines/effects.py`).

Training stages measure in their export function, which the engine calls on rank 0 after the
last validation while the stage's MLflow run is still open: "before" and "after" are the first
and last values of the engine's validation metrics (`validate_at_start: true` gives step 0).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from stages import storage
from stages.tracking import json_text, log_json


def effects_path(output: str) -> str:
    return output.rstrip("/") + "_effects.json"


def write_effects(output: str, effects: dict[str, Any]) -> None:
    fs, path = storage.resolve(effects_path(output))
    storage.write_bytes(fs, path, json_text(effects).encode("utf-8"))


def read_effects(output: str) -> dict[str, Any] | None:
    fs, path = storage.resolve(effects_path(output))
    return json.loads(storage.read_bytes(fs, path)) if storage.exists(fs, path) else None


def log_effect_metrics(effects: dict[str, Any]) -> None:
    """The numeric effects as `effect.<name>` metrics of the active MLflow run (if any)."""
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return
    mlflow.log_metrics({f"effect.{k}": float(v) for k, v in effects.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    log_json(mlflow, effects, "effects.json")


def validation_before_after(names: list[str]) -> dict[str, float]:
    """{name_before, name_after} from the active MLflow run's history of each validation metric."""
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return {}
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    out = {}
    for name in names:
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
        if history and history[0].step == 0:  # validate_at_start: the model before training
            out[f"{name}_before"] = history[0].value
        if history and history[-1].step > 0:
            out[f"{name}_after"], out[f"{name}_after_step"] = history[-1].value, history[-1].step
    return out


def export_with_effects(model, export: Callable[[Any], dict | None], output: str, stage: str,
                        validation: list[str], samples_artifact: str = "", measures_artifact: str = "") -> dict | None:
    """The stage's export, then its effect: validation metrics before / after training (and the
    export's sample answers, and the measures of its artifact `measures_artifact`, a dict such
    as SFT's held-out chat behaviour or the reward model's accuracy per family), written beside
    the output and logged to MLflow."""
    artifacts = export(model) or {}
    effects: dict[str, Any] = {"stage": stage, **validation_before_after(validation),
                               **artifacts.get(measures_artifact, {})}
    if samples_artifact and samples_artifact in artifacts:
        effects["samples"] = artifacts[samples_artifact]
    write_effects(output, effects)
    log_effect_metrics(effects)
    return artifacts


# --- is an answer noise? (the pipeline's final check, the SFT stage's chat behaviour) -----------

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_UNITS = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+|[^\w\s]")
"""Without a tokenizer: each CJK character, each other word, each punctuation mark."""


_SPECIAL = re.compile(r"<\|[^|]*\|>|\[[a-zA-Z]+\]")
"""Role and control tokens as decoded text (<|user|>, [gMASK], [sop], ...): not language."""


def language(text: str) -> str | None:
    """'zh' or 'en' by which script has more characters (None: neither appears); role and
    control tokens ignored."""
    text = _SPECIAL.sub(" ", text)
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    if not cjk and not latin:
        return None
    return "zh" if cjk * 3 >= latin else "en"  # a CJK character carries about a word's worth


_WORD = re.compile(r"[^\W_]")
"""A letter or digit of any script (a CJK character included)."""
_MARK = re.compile(r"[^\w\s]|_")
"""Punctuation and symbols (U+FFFD, the stand-in for broken bytes, included)."""


def _longest_loop(units: list[str]) -> tuple[int, int]:
    """(n, repeats) of the n-gram (n <= 4) repeated back to back the most units' worth."""
    best = (1, 1)
    for n in range(1, 5):
        for start in range(len(units) - n):
            reps = 1
            while units[start + reps * n:start + (reps + 1) * n] == units[start:start + n]:
                reps += 1
            if reps > 1 and reps * n > best[0] * best[1]:
                best = (n, reps)
    return best


def answer_problems(prompt: str, answer: str, tokenize=None) -> list[str]:
    """Why an answer is noise, by what noise is: empty; no words at all; more punctuation and
    symbols than letters; broken characters (bytes that are not UTF-8 text, U+FFFD, other than a
    last character cut by the token limit); a degenerate loop (one token, or a phrase of up to 4
    tokens, repeated back to back over half the answer); or not in the prompt's language. A short
    answer is not noise: "Paris", "分" and "42" pass."""
    text = answer.strip()
    if not text:
        return ["the answer is empty"]
    problems = []
    body = text.rstrip("\ufffd")  # a character the token limit cut (its bytes may decode one by one)
    words, marks = len(_WORD.findall(body)), len(_MARK.findall(body))
    if not words:
        problems.append(f"the answer has no words, only punctuation or symbols ({text[:16]!r})")
    elif marks > words:
        problems.append(f"the answer is mostly punctuation or symbols ({marks} of {marks + words} characters)")
    if "\ufffd" in body:
        problems.append(f"the answer has broken characters ({body.count(chr(0xFFFD))} x U+FFFD: bytes that are not UTF-8 text)")
    units = tokenize(text) if tokenize else _UNITS.findall(text)
    if len(units) >= 2 and len(set(units)) == 1:
        problems.append(f"the answer is one token repeated ({len(units)} x {text[:8]!r})")
    else:
        n, reps = _longest_loop(units)
        if reps >= 3 and n * reps * 2 > len(units):
            problems.append(f"the answer is a loop: a phrase of {n} token(s) repeated {reps} times")
    want, got = language(prompt.replace("[MASK]", "").replace("[gMASK]", "")), language(text)
    if want and got and got != want:
        problems.append(f"the answer is not in the prompt's language ({want}): detected {got}")
    return problems


def chat_behaviour(model, tokenizer, fmt, prompts: list[dict], max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers as served (no repetition blocking, valid UTF-8) to held-out chat prompts
    ({query, history}), one batch: the share in the prompt's language, the share that ended the
    turn by themselves within max_new_tokens, the share that is not noise (`answer_problems`),
    and the share that is all three (`chat_good_rate`), with the answers."""
    from glm.chat_format import Message
    from glm.generation import GenerationConfig, SpanQuery, Utf8Guard, generate_spans

    if not prompts:
        return {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=list(fmt.stop_ids()))
    room = model.config.max_seq_len - max_new_tokens - 2
    queries = []
    for p in prompts:
        messages = [Message(role, text) for q, r in p["history"] for role, text in (("user", q), ("assistant", r))]
        ids = fmt.prompt(messages + [Message("user", p["query"])])[-room:] + [tokenizer.special.gmask]
        queries.append(SpanQuery(ids, len(ids) - 1, True))
    was_training = model.training
    model.eval()
    spans = generate_spans(model, queries, tokenizer.special, config, vocab_limit=len(tokenizer),
                           utf8=Utf8Guard.of(tokenizer))
    model.train(was_training)
    answers, counts = [], {"language": 0, "ended": 0, "sensible": 0, "good": 0}
    for p, span in zip(prompts, spans):
        text = fmt.parse_reply(tokenizer.decode(span)).content.strip()
        problems = answer_problems(p["query"], text)
        ok = {"language": language(text) == language(p["query"]) or language(p["query"]) is None,
              "ended": len(span) < max_new_tokens, "sensible": not problems}
        ok["good"] = all(ok.values())
        counts = {k: v + ok[k] for k, v in counts.items()}
        answers.append({"prompt": p["query"], "response": text, "tokens": len(span), **ok})
    n = len(prompts)
    return {"chat_prompts": n, "chat_max_new_tokens": max_new_tokens,
            **{f"chat_{k}_rate": v / n for k, v in counts.items()}, "chat_answers": answers}
