"""Rebuild data/sample/ from the team's shared data folder (../shared/data by default).

Deterministic ("first N" and fixed row ranges only), permissive licences only; see
ATTRIBUTION.md for each file's source and licence. Run from the repo root:

    python data/sample/make_sample.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path

OUT = Path(__file__).parent

# (source file, destination, first row, number of rows)
ROWS = [
    # English prose and verse: slices spread over each source's works (plays, six Gutenberg
    # books, early and late speeches, Wikipedia articles)
    ("pretrain/en_tinyshakespeare.jsonl", "pretrain/en_tinyshakespeare.jsonl", 0, 50),
    ("pretrain/en_gutenberg.jsonl", "pretrain/en_gutenberg.jsonl", 0, 12),       # Austen, Emma
    ("pretrain/en_gutenberg.jsonl", "pretrain/en_gutenberg.jsonl", 242, 12),     # Austen, Sense and Sensibility
    ("pretrain/en_gutenberg.jsonl", "pretrain/en_gutenberg.jsonl", 566, 12),     # Chesterton, Father Brown
    ("pretrain/en_gutenberg.jsonl", "pretrain/en_gutenberg.jsonl", 679, 12),     # Melville, Moby Dick
    ("pretrain/en_gutenberg.jsonl", "pretrain/en_gutenberg.jsonl", 1081, 12),    # Shakespeare, Hamlet
    ("pretrain/en_gutenberg.jsonl", "pretrain/en_gutenberg.jsonl", 1153, 12),    # Whitman, Leaves of Grass
    ("pretrain/en_us_presidential_speeches.jsonl", "pretrain/en_us_presidential_speeches.jsonl", 0, 4),
    ("pretrain/en_us_presidential_speeches.jsonl", "pretrain/en_us_presidential_speeches.jsonl", 60, 4),
    ("pretrain/en_wikipedia.jsonl", "pretrain/en_wikipedia.jsonl", 0, 10),
    # Chinese: eight chapters of each of the five novels, Wikipedia articles, the classics
    # (论语 ... 楚辞, part of 古文观止) and a slice of 全宋词
    ("pretrain/zh_classical_novels.jsonl", "pretrain/zh_classical_novels.jsonl", 0, 8),      # 三国演义
    ("pretrain/zh_classical_novels.jsonl", "pretrain/zh_classical_novels.jsonl", 112, 8),    # 水浒传
    ("pretrain/zh_classical_novels.jsonl", "pretrain/zh_classical_novels.jsonl", 224, 8),    # 红楼梦
    ("pretrain/zh_classical_novels.jsonl", "pretrain/zh_classical_novels.jsonl", 336, 8),    # 西游记
    ("pretrain/zh_classical_novels.jsonl", "pretrain/zh_classical_novels.jsonl", 428, 8),    # 隋唐演义
    ("pretrain/zh_wikipedia.jsonl", "pretrain/zh_wikipedia.jsonl", 0, 30),
    ("pretrain/zh_classics.jsonl", "pretrain/zh_classics.jsonl", 0, 500),
    ("pretrain/zh_classics.jsonl", "pretrain/zh_classics.jsonl", 847, 300),
    ("mip/en_boolq_train.jsonl", "mip/en_boolq_train.jsonl", 0, 400),
    ("mip/en_openbookqa_train.jsonl", "mip/en_openbookqa_train.jsonl", 0, 1000),
    ("eval/zh_cmrc2018_dev.jsonl", "mip/zh_cmrc2018_train.jsonl", 0, 600),
    ("sft/zh_oasst1.jsonl", "sft/zh_oasst1.jsonl", 0, 689),  # all of it: the smoke SFT needs every chat
    ("preference/zh_oasst1_pairs.jsonl", "preference/zh_oasst1_pairs.jsonl", 0, 200),
    ("preference/en_dpo_llamafactory_demo.jsonl", "preference/en_dpo_demo.jsonl", 150, 150),
    ("preference/en_hh_rlhf_harmless_base_test.jsonl", "preference/en_hh_rlhf_harmless_base.jsonl", 0, 150),
    ("eval/en_lambada_openai_test.jsonl", "eval/en_lambada_openai_test.jsonl", 0, 300),
    ("eval/en_mmlu_dev.jsonl", "eval/en_mmlu_dev.jsonl", 0, 285),
    ("eval/en_openbookqa_test.jsonl", "eval/en_openbookqa_test.jsonl", 0, 300),
    ("eval/en_boolq_dev.jsonl", "eval/en_boolq_dev.jsonl", 0, 200),
    ("eval/zh_cmrc2018_dev.jsonl", "eval/zh_cmrc2018_dev.jsonl", 3000, 219),
]

# (pretraining source, rows taken from its end as held-out text)
HELDOUT = [
    ("pretrain/en_tinyshakespeare.jsonl", 4), ("pretrain/en_gutenberg.jsonl", 4),
    ("pretrain/en_us_presidential_speeches.jsonl", 1), ("pretrain/en_wikipedia.jsonl", 1),
    ("pretrain/zh_classical_novels.jsonl", 2), ("pretrain/zh_wikipedia.jsonl", 2), ("pretrain/zh_classics.jsonl", 24),
]


def rows(path: Path, start: int, count: int):
    with open(path, encoding="utf-8") as f:
        yield from itertools.islice(f, start, start + count)


def write(dest: Path, lines) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line if line.endswith("\n") else line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default="../shared/data", help="the shared data folder")
    shared = Path(parser.parse_args().shared)

    slices: dict[str, list[str]] = {}
    for src, dest, start, count in ROWS:  # several slices of one source go to one file, in order
        slices.setdefault(dest, []).extend(rows(shared / src, start, count))
    for dest, lines in slices.items():
        write(OUT / dest, lines)

    # Held-out text (never trained on by the smoke run): the last rows of every pretraining
    # source, for the quantize gate and the learning check (benchmarks/learning.py).
    for src, count in HELDOUT:
        lines = list(rows(shared / src, 0, 10**9))
        write(OUT / "heldout" / src.split("/")[-1], lines[-count:])

    # English chat SFT: the first 150 LLaMA-Factory DPO demo conversations with their chosen
    # reply, as OpenAI-style messages (rows 150-299 of that file are the preference sample).
    def as_messages(line: str) -> str:
        row = json.loads(line)
        return json.dumps({"messages": row["conversation"] + [{"role": "assistant", "content": row["chosen"]}]},
                          ensure_ascii=False)
    write(OUT / "sft/en_dpo_demo_messages.jsonl",
          map(as_messages, rows(shared / "preference/en_dpo_llamafactory_demo.jsonl", 0, 150)))

    # MMLU test: the first 10 questions of every subject.
    seen: dict[str, int] = {}
    mmlu = []
    for line in rows(shared / "eval/en_mmlu_test.jsonl", 0, 10**9):
        subject = json.loads(line)["subject"]
        if seen.get(subject, 0) < 10:
            seen[subject] = seen.get(subject, 0) + 1
            mmlu.append(line)
    write(OUT / "eval/en_mmlu_test.jsonl", mmlu)

    # XCOPA (zh): validation rows as MIP training data, the first 200 test rows for evaluation.
    xcopa = list(rows(shared / "eval/zh_xcopa.jsonl", 0, 10**9))
    write(OUT / "mip/zh_xcopa_val.jsonl", [r for r in xcopa if json.loads(r)["split"] == "val"])
    write(OUT / "eval/zh_xcopa_test.jsonl", [r for r in xcopa if json.loads(r)["split"] == "test"][:200])

    templates = OUT / "mip/promptsource_templates"
    shutil.rmtree(templates, ignore_errors=True)
    shutil.copytree(shared / "mip/promptsource_templates", templates)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote data/sample: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
