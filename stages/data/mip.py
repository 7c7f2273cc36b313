"""Multi-task instruction pretraining (MIP) samples from labelled rows and prompt templates.

Templates are PromptSource YAML files: each template's `jinja` renders a row to
"prompt ||| answer", with optional `answer_choices` ("A ||| B", itself Jinja). Chinese
templates for the Chinese sets are in `stages/data/templates/zh.yaml`, same format. Each row
uses one template chosen by its index-seeded RNG (GLM_SPEC.md section 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

TEMPLATES_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    jinja: str
    answer_choices: str | None


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def as_mapping(loader, node):
        return loader.construct_mapping(node, deep=True)

    for tag in ("!Template", "!TemplateMetadata"):
        Loader.add_constructor(tag, as_mapping)
    return Loader


@lru_cache(maxsize=64)
def load_templates(path: str) -> tuple[PromptTemplate, ...]:
    """Templates of a PromptSource YAML file, sorted by name (a stable order for seeding)."""
    import yaml

    file = Path(path)
    if not file.exists() and (TEMPLATES_DIR / path).exists():
        file = TEMPLATES_DIR / path
    if not file.exists():
        raise FileNotFoundError(f"MIP template file not found: {path}")
    data = yaml.load(file.read_text(encoding="utf-8"), Loader=_yaml_loader())
    templates = (data or {}).get("templates") or {}
    out = [PromptTemplate(t.get("name", key), t["jinja"], t.get("answer_choices"))
           for key, t in templates.items() if "|||" in t.get("jinja", "")]
    if not out:
        raise ValueError(f"{path}: no templates with a '|||' prompt/answer separator")
    return tuple(sorted(out, key=lambda t: t.name))


@lru_cache(maxsize=1)
def _jinja_env():
    import jinja2

    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)


def render(template: PromptTemplate, row: dict[str, Any]) -> tuple[str, str] | None:
    """(prompt, answer) for a row, or None when the template gives no answer (e.g. label -1)."""
    env = _jinja_env()
    context = dict(row)
    if template.answer_choices:
        choices = env.from_string(template.answer_choices).render(**context)
        context["answer_choices"] = [c.strip() for c in choices.split("|||")]
    text = env.from_string(template.jinja).render(**context)
    if "|||" not in text:
        return None
    prompt, answer = (part.strip() for part in text.split("|||", 1))
    return (prompt, answer) if prompt and answer else None


# --- adapters: native fields of the shared datasets -> the fields the templates expect --------

def _openbookqa(row: dict) -> dict:
    letters = [chr(ord("A") + i) for i in range(len(row["choices"]))]
    return {"id": row.get("id", ""), "question_stem": row["question"],
            "choices": {"text": row["choices"], "label": letters}, "answerKey": row["answer"]}


def _boolq(row: dict) -> dict:
    label = row["label"]
    return {**row, "label": int(label) if isinstance(label, bool) else label}


def _rte(row: dict) -> dict:
    return {**row, "sentence1": row["premise"], "sentence2": row["hypothesis"]}


def _cmrc2018(row: dict) -> dict:
    return {**row, "answer": row["answers"][0]}


ADAPTERS: dict[str, Callable[[dict], dict]] = {
    "identity": lambda row: row,
    "openbookqa": _openbookqa,
    "boolq": _boolq,
    "cmrc2018": _cmrc2018,
    "rte": _rte,
}


def prompted_pair(line: bytes, adapter: str, templates: tuple[PromptTemplate, ...], rng) -> tuple[str, str, str]:
    """(prompt, answer, reason) for one JSONL line; reason "" when usable."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "", "", "invalid_utf8"
    except json.JSONDecodeError:
        return "", "", "bad_json"
    if not isinstance(row, dict):
        return "", "", "bad_json"
    template = templates[rng.randrange(len(templates))]
    try:
        pair = render(template, ADAPTERS[adapter](row))
    except Exception:  # a missing field, a label out of range: the row does not fit the template
        return "", "", "template_error"
    if pair is None:
        return "", "", "no_answer"
    return pair[0], pair[1], ""
