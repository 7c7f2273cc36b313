"""Quality rules, language ID, decontamination and near-duplicate detection on crafted documents (no Ray)."""

import json
import random

import numpy as np
import pytest

from conftest import SAMPLE
from stages.data import corpus, decontam, dedup, langid, quality
from stages.data.config import CorpusSource, DataConfig
from stages.data.quality import QualityConfig

PROSE = ("The history of the river valley is a long one, and the people who have lived there have left many "
         "traces of their work. Farmers built terraces on the hills and the towns grew along the water, where "
         "boats carried grain and wood to the markets of the coast. In the winter the floods came with the snow "
         "from the mountains, and every village kept a record of the high water on the wall of its church. ")
ZH = ("黄河是中国的第二长河，发源于青藏高原，流经九个省区，最后注入渤海。它孕育了古老的中华文明，"
      "因此被称为母亲河。在历史上，黄河多次改道，给两岸的人民带来了巨大的灾难，也留下了肥沃的土地。"
      "今天，人们修建了许多水利工程，用来防洪、灌溉和发电，这条大河的面貌已经发生了很大的变化。")


def test_clean_prose_passes_every_rule():
    assert quality.check(PROSE, QualityConfig()) == ""
    assert quality.check(ZH, QualityConfig()) == ""


@pytest.mark.parametrize("text, rule", [
    ("The cat sat on the mat and that was all.", "word_count"),
    (" ".join(["extraordinarilylongwordsonly"] * 60) + " the and", "mean_word_length"),
    (" ".join(["a b c"] * 40) + " the and", "mean_word_length"),
    (PROSE + " # # # # # # # # # # # # # # # # # # # # # # # # # # # # # # # # #", "symbol_ratio"),
    ("\n".join(f"- item number {i} of the list with the and of words" for i in range(20)), "bullet_lines"),
    ("\n".join(f"and then the wonderful history of the kingdom {i} continued endlessly ..." for i in range(20)),
     "ellipsis_lines"),
    (PROSE + " " + " ".join(["123", "456", "789", "--", "%%"] * 30), "alpha_words"),
    (" ".join(["river", "valley", "farmers", "built", "terraces", "towns", "boats", "grain"] * 10), "stop_words"),
    ("\n".join(["the same line of text and of words here"] * 6 + [PROSE]), "duplicate_lines"),
    ("\n\n".join(["\n".join(f"line number {i} of the text about the river and the valley" for i in range(10))]
                 + ["the paragraph of the text with words"] * 4),
     "duplicate_paragraphs"),
    ("\n".join([PROSE.replace(". ", ".\n")] + [" ".join(f"the long line with word {i}" for i in range(12))] * 2),
     "duplicate_line_chars"),
    (PROSE + " " + " ".join(["of the"] * 60), "top_ngram"),
    (PROSE + " " + PROSE[:300], "duplicate_ngrams"),
])
def test_each_rule_rejects_its_document(text, rule):
    assert quality.check(text, QualityConfig()) == rule


def test_chinese_variant():
    cfg = QualityConfig()
    assert quality.check("黄河是中国的第二长河。", cfg) == "word_count"  # counted in characters
    no_stop = "".join(c for c in ZH if c not in quality.STOP_WORDS_ZH)
    assert quality.check(no_stop, cfg) == "stop_words"
    assert quality.check(ZH + "母亲河母亲河母亲河" * 20, cfg) == "top_ngram"
    assert quality.check(ZH + ZH[:60], cfg) == "duplicate_ngrams"
    # thresholds come from the config
    assert quality.check(ZH + ZH[:60], QualityConfig(cjk_max_duplicate_ngrams={10: 0.5})) == ""
    assert quality.check("short", QualityConfig(enabled=False)) == ""


def test_language_detection_and_source_tags():
    assert langid.detect(PROSE)[0] == "en"
    assert langid.family(langid.detect(ZH)[0]) == "zh"
    assert langid.expected("en,zh-Hans") == ["en", "zh"]
    assert langid.expected("mixed") == [] and langid.expected("") == []


def test_decontamination_against_a_shipped_task():
    cfg = decontam.DecontamConfig(tasks=["stages/eval/tasks/en/boolq.yaml", "stages/eval/tasks/zh/cmrc2018.yaml"])
    index = decontam.build_index(cfg)
    assert index["names"] == ["boolq", "cmrc2018"] and index["ngrams"]["boolq"] > 0
    passage = json.loads(open(SAMPLE / "eval/en_boolq_dev.jsonl", encoding="utf-8").readline())["passage"]
    words = passage.split()
    leaked = PROSE + " " + " ".join(words[5:20]).upper() + " " + PROSE  # case and context do not hide it
    assert [index["names"][t] for t in decontam.matches(leaked, index, cfg)] == ["boolq"]
    assert decontam.matches(PROSE + " " + " ".join(words[5:16]), index, cfg) == []  # 11 words: below 13
    context = json.loads(open(SAMPLE / "eval/zh_cmrc2018_dev.jsonl", encoding="utf-8").readline())["context"]
    assert [index["names"][t] for t in decontam.matches(ZH + context[40:60], index, cfg)] == ["cmrc2018"]
    assert decontam.matches(ZH, index, cfg) == []
    again = decontam.from_bytes(decontam.to_bytes(index))
    assert decontam.matches(leaked, again, cfg) == [0]


def sample_docs(name: str, n: int) -> list[str]:
    with open(SAMPLE / "pretrain" / name, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


def edit(text: str, share: float, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, int(len(words) * share))):
        words[i] = "w" + str(rng.randrange(10**6))
    return " ".join(words)


def test_minhash_finds_near_duplicates_and_spares_distinct_documents():
    rng = random.Random(0)
    cfg = dedup.DedupConfig()
    a, b = dedup.permutations(cfg.num_perm, cfg.seed)
    en, zh = sample_docs("en_wikipedia.jsonl", 2), sample_docs("zh_wikipedia.jsonl", 1)
    docs = [en[0], edit(en[0], 0.01, rng), en[1], zh[0], zh[0] + "新的一句话。"]
    sigs = np.stack([dedup.signature(dedup.shingles(d, cfg.shingle_size), a, b) for d in docs])
    exact = np.array([hash(d) for d in docs], dtype=np.int64)
    roots, stats = dedup.clusters(sigs, exact, cfg)
    assert roots.tolist() == [0, 0, 2, 3, 3]
    assert stats["verified_pairs"] >= 2
    # exact duplicates need no signature
    roots, _ = dedup.clusters(np.zeros((3, cfg.num_perm), np.uint32), np.array([5, 7, 5]), dedup.DedupConfig(near=False))
    assert roots.tolist() == [0, 1, 0]


def test_repeated_paragraphs():
    hashes = [np.array([1, 2, 0]), np.array([2, 3, 0]), np.array([1, 3, 4])]
    assert dedup.repeated_paragraphs(hashes) == {1: [0], 2: [0, 1]}


def screened(texts_by_source, cfg, order):
    rows = [{"source": s, "path": f"f{s}.jsonl", "line": n + 1, "text": t, "reason": "",
             "doc_hash": corpus.doc_hash(t)} for s, texts in enumerate(texts_by_source) for n, t in enumerate(texts)]
    rows = corpus.screen_rows(rows, corpus.screen_settings(cfg))
    rows = [rows[i] for i in order(len(rows))]
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=corpus.SCREEN_SCHEMA).select(corpus.META_COLUMNS)


def test_plan_counts_and_is_independent_of_row_order():
    rng = random.Random(1)
    wiki, zh_wiki = sample_docs("en_wikipedia.jsonl", 3), sample_docs("zh_wikipedia.jsonl", 2)
    en = [wiki[0], edit(wiki[0], 0.01, rng), "too few words here but long enough", wiki[0], zh_wiki[0], wiki[1]]
    zh = [zh_wiki[1], wiki[2]]
    cfg = DataConfig(sources=[CorpusSource(uri="x", name="en", language="en"),
                              CorpusSource(uri="y", name="zh", language="zh")], output="unused")
    cfg.decontamination.enabled = False
    cfg.dedup.paragraphs = True
    plans = [corpus.plan(screened([en, zh], cfg, order), cfg) for order in (
        lambda n: list(range(n)), lambda n: list(reversed(range(n))), lambda n: random.Random(3).sample(range(n), n))]
    p = plans[0]
    assert p.counts[(0, "quality")] == 1 and p.per_source[0]["quality_rejected"] == {"word_count": 1}
    assert p.counts[(0, "language")] == 1 and p.counts[(1, "language")] == 1  # ZH in en, PROSE in zh
    assert p.counts[(0, "duplicate")] == 1 and p.counts[(0, "near_duplicate")] == 1
    assert p.sections["dedup"]["cluster_sizes"] == {"3": 1}
    assert p.clusters.num_rows == 3 and sum(p.clusters["kept"].to_pylist()) == 1
    assert set(p.samples) == {"word_count", "language"}
    for other in plans[1:]:
        assert other.counts == p.counts and other.removed.tolist() == p.removed.tolist()
        assert other.sections == p.sections and other.clusters.equals(p.clusters)
    routed = DataConfig(sources=cfg.sources, output="unused")
    routed.language.mismatch = "route"
    routed.decontamination.enabled = False
    q = corpus.plan(screened([en, zh], routed, lambda n: list(range(n))), routed)
    assert q.per_source[0]["routed_out"] == 1 and q.per_source[1]["routed_in"] == 1
    assert sorted(q.routed.values()) == [0, 1]


def test_apply_plan_drops_routes_and_cuts_paragraphs():
    import pyarrow as pa

    texts = ["first paragraph\n\nshared paragraph", "other\n\nshared paragraph\n\nlast", "gone", ""]
    batch = pa.table({"doc_key": pa.array([10, 20, 30, 40], pa.int64()), "text": texts,
                      "source": pa.array([0, 0, 1, 0], pa.int32()), "reason": ["", "", "", "quality"],
                      "doc_hash": pa.array([corpus.doc_hash(t) for t in texts], pa.int64())})
    out = corpus.apply_plan(batch, removed=np.array([30], np.int64), routed={10: 1}, cut={20: [1]})
    assert out["text"].to_pylist() == [texts[0], "other\n\nlast"]
    assert out["source"].to_pylist() == [1, 0]
    assert out["doc_hash"].to_pylist() == [corpus.doc_hash(texts[0]), corpus.doc_hash("other\n\nlast")]
    assert out["duplicate"].to_pylist() == [False, False]
