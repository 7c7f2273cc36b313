"""The data stage's corpus-scale screening end to end (real Ray Data): per-rule, per-language and
per-task counts, near-duplicates, rejected samples, worker-count independence, input fingerprints."""

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE, small_ray_data_blocks
from stages.data.config import CleanConfig, CorpusSource, DataConfig, MIPConfig, ObjectiveConfig, TokenizerSettings
from stages.data.decontam import DecontamConfig
from stages.data.stage import run

pytestmark = pytest.mark.integration


def lines(name: str, start: int, n: int) -> list[str]:
    with open(SAMPLE / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f][start:start + n]


def write(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def near_copy(text: str, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), len(words) // 100 + 1):
        words[i] = "edited"
    return " ".join(words)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, ray_instance, tokenizer):
    tmp = tmp_path_factory.mktemp("scale")
    rng = random.Random(0)
    en = [r["text"] for r in lines("pretrain/en_gutenberg.jsonl", 0, 16)]
    zh = [r["text"] for r in lines("pretrain/zh_wikipedia.jsonl", 0, 6)]
    passage = lines("eval/en_boolq_dev.jsonl", 0, 1)[0]["passage"]
    context = lines("eval/zh_cmrc2018_dev.jsonl", 0, 1)[0]["context"]
    crafted_en = [
        near_copy(en[0], rng),                                                  # near_duplicate
        en[1],                                                                  # duplicate
        "\n".join(f"- buy now item {i} of the best and the cheapest deals" for i in range(30)),  # bullet_lines
        zh[0],                                                                  # language (zh in an en source)
        en[2][:2000] + " " + " ".join(passage.split()[:20]),                    # contaminated: boolq
    ]
    crafted_zh = [zh[1][:1500] + context[:40]]                                  # contaminated: cmrc2018
    corpus = tmp / "corpus"
    corpus.mkdir()
    write(corpus / "en.jsonl", en + crafted_en)
    write(corpus / "zh.jsonl", zh[1:] + crafted_zh)
    tok = tokenizer.save(tmp)

    def cfg(out: str, workers: int = 2, driver_bytes: int = 8 << 20) -> DataConfig:
        return DataConfig(
            sources=[CorpusSource(uri=str(corpus / "en.jsonl"), name="en", language="en"),
                     CorpusSource(uri=str(corpus / "zh.jsonl"), name="zh", language="zh")],
            output=str(tmp / out), clean=CleanConfig(min_chars=10), tokenizer=TokenizerSettings(path=str(tok)),
            objective=ObjectiveConfig(seq_len=64, mask_window=32), mip=MIPConfig(token_share=0.0),
            decontamination=DecontamConfig(tasks=["stages/eval/tasks/en/boolq.yaml", "stages/eval/tasks/zh/cmrc2018.yaml"]),
            validation_fraction=0.1, num_buckets=2, workers=workers, driver_bytes=driver_bytes)

    outputs = {"two": Path(run(cfg("two")))}
    with small_ray_data_blocks():  # one worker, every step on other blocks, group steps as Ray tasks
        outputs["one"] = Path(run(cfg("one", workers=1, driver_bytes=0)))
    return tmp, corpus, cfg, outputs


def test_manifest_counts_every_rule_language_and_task(crafted):
    _, _, _, out = crafted
    m = json.loads((out["two"] / "manifest.json").read_text())
    en, zh = m["sources"]["en"], m["sources"]["zh"]
    assert en["rows_read"] == 21 and zh["rows_read"] == 6
    assert en["rejected"]["near_duplicate"] == 1 and en["rejected"]["duplicate"] == 1
    assert en["quality_rejected"] == {"bullet_lines": 1} and en["rejected"]["quality"] == 1
    assert en["rejected"]["language"] == 1 and en["language_mismatch"] == 1
    assert en["detected_languages"]["en"] >= 17 and zh["detected_languages"] == {"zh": 6}
    assert en["contaminated"] == {"boolq": 1} and zh["contaminated"] == {"cmrc2018": 1}
    assert m["decontamination"]["documents_per_task"] == {"boolq": 1, "cmrc2018": 1}
    assert en["kept"] == 16 and zh["kept"] == 5
    assert m["quality"]["rejected"] == {"bullet_lines": 1}
    assert m["dedup"]["cluster_sizes"] == {"2": 2} and m["dedup"]["removed"] == 2
    clusters = pq.read_table(out["two"] / m["dedup"]["clusters_file"]).to_pylist()
    assert sorted((c["line"], c["kept"]) for c in clusters) == [(1, True), (2, True), (17, False), (18, False)]
    for rule in ("bullet_lines", "language", "contaminated"):
        rows = [json.loads(l) for l in (out["two"] / m["rejected_samples"][rule]).read_text().splitlines()]
        assert rows and all(r["text"] for r in rows)
    assert m["inputs"]["files"] >= 4 and m["inputs"]["fingerprint"]


def test_one_and_two_workers_give_identical_output(crafted):
    _, _, _, out = crafted
    files = sorted(p.relative_to(out["two"]) for p in out["two"].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out["one"]) for p in out["one"].rglob("*") if p.is_file())
    for f in files:
        if f.name != "manifest.json":
            assert (out["two"] / f).read_bytes() == (out["one"] / f).read_bytes(), f
    m1, m2 = (json.loads((out[k] / "manifest.json").read_text()) for k in ("one", "two"))
    assert m1 == m2


def test_a_changed_input_rebuilds(crafted, capsys):
    tmp, corpus, cfg, out = crafted
    run(cfg("two"))
    assert "reusing it" in capsys.readouterr().out
    extra = [r["text"] for r in lines("pretrain/en_gutenberg.jsonl", 30, 3)]
    with open(corpus / "en.jsonl", "a", encoding="utf-8") as f:
        for t in extra:
            f.write(json.dumps({"text": t}) + "\n")
    run(cfg("two"))
    assert "reusing it" not in capsys.readouterr().out
    m = json.loads((out["two"] / "manifest.json").read_text())
    assert m["sources"]["en"]["rows_read"] == 24
