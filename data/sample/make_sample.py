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
    ("pretrain/en_tinyshakespeare.jsonl", "pretrain/en_tinyshakespeare.jsonl", 0, 60),
    ("pretrain/en_gutenberg.jsonl", "pretrain/en_gutenberg.jsonl", 0, 80),
    ("pretrain/en_us_presidential_speeches.jsonl", "pretrain/en_us_presidential_speeches.jsonl", 0, 8),
    ("pretrain/en_wikipedia.jsonl", "pretrain/en_wikipedia.jsonl", 0, 12),
    ("pretrain/zh_classical_novels.jsonl", "pretrain/zh_classical_novels.jsonl", 0, 40),
    ("pretrain/zh_wikipedia.jsonl", "pretrain/zh_wikipedia.jsonl", 0, 20),
    ("pretrain/zh_classics.jsonl", "pretrain/zh_classics.jsonl", 0, 600),
    ("mip/en_boolq_train.jsonl", "mip/en_boolq_train.jsonl", 0, 400),
    ("mip/en_openbookqa_train.jsonl", "mip/en_openbookqa_train.jsonl", 0, 1000),
    ("eval/zh_cmrc2018_dev.jsonl", "mip/zh_cmrc2018_train.jsonl", 0, 600),
    ("sft/zh_oasst1.jsonl", "sft/zh_oasst1.jsonl", 0, 300),
    ("preference/zh_oasst1_pairs.jsonl", "preference/zh_oasst1_pairs.jsonl", 0, 200),
    ("preference/en_dpo_llamafactory_demo.jsonl", "preference/en_dpo_demo.jsonl", 150, 150),
    ("preference/en_hh_rlhf_harmless_base_test.jsonl", "preference/en_hh_rlhf_harmless_base.jsonl", 0, 150),
    ("eval/en_lambada_openai_test.jsonl", "eval/en_lambada_openai_test.jsonl", 0, 300),
    ("eval/en_mmlu_dev.jsonl", "eval/en_mmlu_dev.jsonl", 0, 285),
    ("eval/en_openbookqa_test.jsonl", "eval/en_openbookqa_test.jsonl", 0, 300),
    ("eval/en_boolq_dev.jsonl", "eval/en_boolq_dev.jsonl", 0, 200),
    ("eval/zh_cmrc2018_dev.jsonl", "eval/zh_cmrc2018_dev.jsonl", 3000, 219),
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

    for src, dest, start, count in ROWS:
        write(OUT / dest, rows(shared / src, start, count))

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
