"""Rows of an eval file -> Items: GLM-130B's JSONL shape, and adapters for the native fields
of the shared eval sets (../shared/data/eval, data/sample/eval).

Prompts follow the MIP templates the model was trained with (stages/data/templates, PromptSource):
the prompt is the bidirectional context, the answer (no leading space) is the Part-B span.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Item:
    """One evaluation item in GLM-130B's shape (fields a task type does not use stay empty)."""

    inputs: str = ""
    """The context (`inputs_pretokenized`)."""
    choices: list[str] = field(default_factory=list)
    """Multiple choice: the candidate answers (`choices_pretokenized`)."""
    label: int = -1
    """Multiple choice: index of the right choice."""
    targets: list[str] = field(default_factory=list)
    """Generation / LAMBADA: reference answers (`targets_pretokenized`, a string or a list)."""
    text: str = ""
    """Perplexity: the document (`text`)."""

    def answer(self) -> str:
        """The reference answer as text (for few-shot demonstrations)."""
        return self.choices[self.label] if self.choices else (self.targets[0] if self.targets else "")


def _glm(row: dict) -> Item:
    targets = row.get("targets_pretokenized", [])
    return Item(
        inputs=row.get("inputs_pretokenized", ""),
        choices=list(row.get("choices_pretokenized", [])),
        label=int(row.get("label", -1)),
        targets=[targets] if isinstance(targets, str) else list(targets),
        text=row.get("text", ""),
    )


LETTERS = "ABCDEFGH"


def _lettered(question: str, options: list[str], answer_cue: str) -> str:
    lines = [question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + f"\n{answer_cue}"


def _mmlu(row: dict) -> Item:
    """MMLU (subject, question, choices, answer letter): options listed, the letter is scored."""
    subject = row["subject"].replace("_", " ")
    head = f"The following is a multiple choice question about {subject}.\n\n{row['question']}"
    return Item(inputs=_lettered(head, row["choices"], "Answer:"), choices=list(LETTERS[:len(row["choices"])]),
                label=LETTERS.index(row["answer"]))


def _cmmlu(row: dict) -> Item:
    """CMMLU: as MMLU, with the Chinese prompt of the CMMLU paper."""
    head = f"以下是关于{row['subject']}的单项选择题，请直接给出正确答案的选项。\n\n题目：{row['question']}"
    return Item(inputs=_lettered(head, row["choices"], "答案是："), choices=list(LETTERS[:len(row["choices"])]),
                label=LETTERS.index(row["answer"]))


def _openbookqa(row: dict) -> Item:
    """OpenBookQA: the answer text of each option is scored after the question."""
    return Item(inputs=row["question"], choices=list(row["choices"]), label=LETTERS.index(row["answer"]))


def _boolq(row: dict) -> Item:
    label = row["label"]
    label = {"true": 1, "false": 0}.get(str(label).lower(), label)
    return Item(inputs=f"Passage: {row['passage']}\nQuestion: {row['question']}?\nAnswer:",
                choices=["No", "Yes"], label=int(label))


def _rte(row: dict) -> Item:
    """RTE (GLUE): label 0 = entailment, 1 = not_entailment."""
    return Item(inputs=f"{row['premise']}\nQuestion: Does this imply that \"{row['hypothesis']}\"? Yes or no?",
                choices=["Yes", "No"], label=int(row["label"]))


def _sst2(row: dict) -> Item:
    return Item(inputs=f"{row['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                choices=["negative", "positive"], label=int(row["label"]))


def _agnews(row: dict) -> Item:
    """AG News: label World=0, Sports=1, Business=2, Sci/Tech=3."""
    return Item(inputs=f"{row['text']}\nWhich topic is this article about?",
                choices=["World politics", "Sports", "Business", "Science and technology"], label=int(row["label"]))


def _xcopa(row: dict) -> Item:
    """XCOPA (zh): premise + cause/effect cue; the two alternatives are scored."""
    cue = "原因是：" if row["question"] == "cause" else "结果是："
    return Item(inputs=f"{row['premise']}{cue}", choices=[row["choice1"], row["choice2"]], label=int(row["label"]))


OCNLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}


def _ocnli(row: dict) -> Item:
    return Item(inputs=f"前提：{row['premise']}\n假设：{row['hypothesis']}\n前提与假设的关系是蕴含、中立还是矛盾？",
                choices=["蕴含", "中立", "矛盾"], label=OCNLI_LABELS[row["label"]])


# TNEWS's 15 topics by label id, as label_zh in the FewCLUE data.
TNEWS_LABELS = {100: "故事", 101: "文化", 102: "娱乐", 103: "体育", 104: "财经", 106: "房产", 107: "汽车",
                108: "教育", 109: "科技", 110: "军事", 112: "旅游", 113: "国际", 114: "股票", 115: "农业", 116: "电竞"}


def _tnews(row: dict) -> Item:
    ids = sorted(TNEWS_LABELS)
    return Item(inputs=f"新闻标题：{row['sentence']}\n这条新闻属于哪个类别？", choices=[TNEWS_LABELS[i] for i in ids],
                label=ids.index(int(row["label"])))


def _eprstmt(row: dict) -> Item:
    return Item(inputs=f"商品评价：{row['sentence']}\n这是好评还是差评？", choices=["差评", "好评"], label=int(row["label"]))


def _cmrc2018(row: dict) -> Item:
    return Item(inputs=f"阅读下面的文章，回答问题。\n文章：{row['context']}\n问题：{row['question']}",
                targets=list(row["answers"]))


def _lambada(row: dict) -> Item:
    """LAMBADA: `context` + last word `target` (for last-word accuracy), `text` (for perplexity)."""
    return Item(inputs=row["context"], targets=[" " + row["target"]], text=row["text"])


ADAPTERS: dict[str, Callable[[dict], Item]] = {
    "glm": _glm,
    "mmlu": _mmlu,
    "cmmlu": _cmmlu,
    "openbookqa": _openbookqa,
    "boolq": _boolq,
    "rte": _rte,
    "sst2": _sst2,
    "agnews": _agnews,
    "xcopa": _xcopa,
    "ocnli": _ocnli,
    "tnews": _tnews,
    "eprstmt": _eprstmt,
    "cmrc2018": _cmrc2018,
    "lambada": _lambada,
}
