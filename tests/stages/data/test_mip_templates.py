"""MIP templates: every shipped Chinese template and the sample PromptSource files render rows."""

import random
from pathlib import Path

import pytest

from conftest import SAMPLE
from stages.data.mip import TEMPLATES_DIR, load_templates, prompted_pair, render

CASES = [  # (template file, sample data, adapter)
    ("zh/xcopa.yaml", "mip/zh_xcopa_val.jsonl", "identity"),
    ("zh/cmrc2018.yaml", "mip/zh_cmrc2018_train.jsonl", "cmrc2018"),
    (str(SAMPLE / "mip/promptsource_templates/openbookqa/main/templates.yaml"), "mip/en_openbookqa_train.jsonl", "openbookqa"),
    (str(SAMPLE / "mip/promptsource_templates/super_glue/boolq/templates.yaml"), "mip/en_boolq_train.jsonl", "boolq"),
]


@pytest.mark.parametrize("templates,data,adapter", CASES)
def test_templates_render_sample_rows(templates, data, adapter):
    ts = load_templates(templates)
    lines = (SAMPLE / data).read_bytes().split(b"\n")[:30]
    for i, line in enumerate(lines):
        prompt, answer, reason = prompted_pair(line, adapter, ts, random.Random(i))
        assert reason == "" and prompt and answer


ROWS = {
    "sentiment_review.yaml": {"review": "很好吃", "label": 1},
    "eprstmt.yaml": {"sentence": "物流很快", "label": 0},
    "tnews.yaml": {"sentence": "股市大涨", "label_zh": "财经"},
    "iflytek.yaml": {"sentence": "一款地图应用", "label_des": "地图导航"},
    "ocnli.yaml": {"premise": "他在跑步", "hypothesis": "他在运动", "label": "entailment"},
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_chinese_templates_render(name):
    for t in load_templates(f"zh/{name}"):
        prompt, answer = render(t, ROWS[name])
        assert prompt and answer


def test_every_chinese_template_file_is_tested():
    shipped = {p.name for p in (TEMPLATES_DIR / "zh").glob("*.yaml")}
    with_sample_rows = {Path(t).name for t, _, _ in CASES if t.startswith("zh/")}
    assert shipped == set(ROWS) | with_sample_rows


def test_bad_rows_and_missing_files():
    ts = load_templates("zh/xcopa.yaml")
    assert prompted_pair(b'{"premise": ', "identity", ts, random.Random(0))[2] == "bad_json"
    assert prompted_pair(b'{"premise": "x"}', "identity", ts, random.Random(0))[2] == "template_error"
    with pytest.raises(FileNotFoundError, match="MIP template file not found"):
        load_templates(str(Path("/nonexistent.yaml")))
