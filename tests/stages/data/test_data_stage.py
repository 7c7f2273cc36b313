"""The data stage end to end with real Ray Data on tiny inputs: counts, invariants, determinism, MIP share."""

import contextlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE, small_ray_data_blocks
from glm.schema import IGNORE_INDEX
from glm.tokenizer import GLMTokenizer
from stages.data.blank_infilling import KIND_MIP
from stages.data.config import (CleanConfig, CorpusSource, DataConfig, MIPConfig, MIPDataset, ObjectiveConfig,
                                TokenizerSettings, TrackingConfig)
from stages.data.quality import QualityConfig
from stages.data.stage import run

pytestmark = pytest.mark.integration


def tiny_corpus(dir: Path) -> list[str]:
    """A small bilingual corpus (JSONL) with one duplicated document; returns the good texts."""
    texts = []
    for name, n in (("en_tinyshakespeare", 12), ("zh_classics", 150), ("zh_classical_novels", 2)):
        with open(SAMPLE / "pretrain" / f"{name}.jsonl", encoding="utf-8") as f:
            texts += [json.loads(next(f))["text"] for _ in range(n)]
    # corpus text that spells control tokens: it must stay text (and be counted in the manifest)
    texts[5] += " [eop] and [sop]"
    texts[120] = "[MASK]" + texts[120]
    texts[130] += "</s>[gMASK][sMASK]<pad>"
    dir.mkdir(parents=True, exist_ok=True)
    with open(dir / "a.jsonl", "w", encoding="utf-8") as f:
        for t in texts[:100] + [texts[0]]:  # the last line duplicates the first document
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    with open(dir / "b.jsonl", "w", encoding="utf-8") as f:
        for t in texts[100:]:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return texts


def config(tmp: Path, corpus: Path, out: str, workers: int = 2, sample: Path = SAMPLE, **kw) -> DataConfig:
    mip = MIPConfig(token_share=0.05, datasets=[
        MIPDataset(uri=str(sample / "mip/en_openbookqa_train.jsonl"), adapter="openbookqa", cap=300,
                   templates=str(sample / "mip/promptsource_templates/openbookqa/main/templates.yaml"),
                   name="openbookqa"),
        MIPDataset(uri=str(sample / "mip/zh_xcopa_val.jsonl"), templates="zh/xcopa.yaml", name="xcopa"),
    ])
    fields = dict(
        sources=[CorpusSource(uri=str(corpus / "*.jsonl"), name="tiny", language="en,zh")], output=str(tmp / out),
        clean=CleanConfig(min_chars=10), tokenizer=TokenizerSettings(vocab_size=3000, character_coverage=0.98),
        objective=ObjectiveConfig(seq_len=128, mask_window=32), mip=mip, validation_fraction=0.05,
        num_buckets=3, rows_per_shard=100, workers=workers)
    return DataConfig(**{**fields, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_instance):
    tmp = tmp_path_factory.mktemp("data")
    texts = tiny_corpus(tmp / "corpus")
    # run "b" reads copies of every input at another path: the output must not depend on where they lie
    elsewhere = tmp / "elsewhere" / "checkout"
    shutil.copytree(tmp / "corpus", elsewhere / "corpus")
    shutil.copytree(SAMPLE / "mip", elsewhere / "sample" / "mip")
    outputs = {}
    for name, workers in (("a", 2), ("b", 2), ("one_worker", 1)):
        cfg = config(tmp, tmp / "corpus", name, workers=workers)
        if name == "b":  # tracked run, inputs elsewhere: neither MLflow nor the inputs' path changes the output
            cfg = config(tmp, elsewhere / "corpus", name, workers=workers, sample=elsewhere / "sample")
            cfg.tracking = TrackingConfig(enabled=True, experiment="data-test",
                                          tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
        blocks = contextlib.nullcontext()
        if name == "one_worker":  # one worker, every step on other blocks, group steps as Ray tasks
            cfg.driver_bytes, blocks = 0, small_ray_data_blocks()
        with blocks:
            outputs[name] = Path(run(cfg))
    return tmp, texts, outputs


def rows_of(out: Path, split: str):
    for path in sorted((out / split).glob("*.parquet")):
        yield from pq.read_table(path).to_pylist()


def test_runs_and_worker_counts_give_identical_shards(built):
    """Byte-identical shards and tokenizer for another worker count, and for copies of the inputs
    at another path (run "b"); the reports (dedup clusters, rejected rows) name the input files,
    so they are the same apart from those paths."""
    tmp, _, out = built
    files = sorted(p.relative_to(out["a"]) for p in out["a"].rglob("*.parquet"))
    assert any(f.parts[0] == "train" for f in files) and any(f.parts[0] == "validation" for f in files)
    for other in ("b", "one_worker"):
        assert sorted(p.relative_to(out[other]) for p in out[other].rglob("*.parquet")) == files
        assert (out["a"] / "tokenizer.model").read_bytes() == (out[other] / "tokenizer.model").read_bytes()
        for f in files:
            if f.parts[0] in ("train", "validation"):
                assert (out["a"] / f).read_bytes() == (out[other] / f).read_bytes(), f"{f} differs ({other})"
            else:
                report = [pq.read_table(out[o] / f).to_pylist() for o in ("a", other)]
                for rows, root in zip(report, (tmp, tmp / "elsewhere" / "checkout" if other == "b" else tmp)):
                    for r in rows:
                        r["path"] = r["path"].replace(str(root), "ROOT")
                assert report[0] == report[1], f"{f} differs ({other})"
    assert (out["a"] / "manifest.json").read_text() == (out["one_worker"] / "manifest.json").read_text()


def test_manifest_counts_and_mip_share(built):
    _, texts, out = built
    m = json.loads((out["a"] / "manifest.json").read_text())
    src = m["sources"]["tiny"]
    assert src["rows_read"] == len(texts) + 1 and src["rejected"]["duplicate"] == 1
    filtered = sum(src["rejected"][r] for r in ("quality", "language", "contaminated", "near_duplicate"))
    assert src["kept"] == len(texts) - filtered and filtered < len(texts) // 4  # classical poems: some repetitive
    assert src["documents_with_control_strings"] == sum(GLMTokenizer.has_control_strings(t) for t in texts) == 3
    assert abs(m["mip"]["token_share"] - 0.05) < 0.005
    assert m["splits"]["train"]["rows"] > 0 and m["splits"]["validation"]["rows"] > 0
    assert m["mip"]["datasets"]["openbookqa"]["over_cap"] == 1000 - 300


def test_every_row_satisfies_the_schema_and_decodes_back(built):
    _, texts, out = built
    tok = GLMTokenizer.load(out["a"])
    special = tok.special
    docs = ["," + ",".join(map(str, tok.encode(t))) + "," for t in texts]
    indices = []
    for split in ("train", "validation"):
        for row in rows_of(out["a"], split):
            indices.append((split, row["index"]))
            ids, labels, pos, block = row["input_ids"], row["labels"], row["position_ids"], row["block_position_ids"]
            seg, pre = row["segment_ids"], row["prefix_mask"]
            assert all(len(c) == 128 for c in (ids, labels, pos, block, seg, pre))
            for s in set(seg) - {0}:
                idx = [i for i, x in enumerate(seg) if x == s]
                assert idx == list(range(idx[0], idx[-1] + 1))  # contiguous segment
                part_a = [i for i in idx if pre[i]]
                part_b = [i for i in idx if not pre[i]]
                assert part_a == idx[:len(part_a)]  # Part A first
                assert all(labels[i] == IGNORE_INDEX for i in part_a)  # labels only on Part B
                a0 = part_a[0]
                for i in part_b:  # 2D: every Part-B token sits at a mask position of Part A
                    assert ids[a0 + pos[i]] in special.mask_ids
                if row["kind"] != KIND_MIP:
                    for piece in split_on(reconstruct(ids, labels, pos, part_a, part_b, special), special.eos):
                        if len(piece) > 1:
                            needle = "," + ",".join(map(str, piece)) + ","
                            assert any(needle in d for d in docs), "a window is not a slice of a document"
            pad = [i for i, x in enumerate(seg) if x == 0]
            assert all(labels[i] == IGNORE_INDEX and ids[i] == special.pad for i in pad)
    for split in ("train", "validation"):
        got = sorted(i for s, i in indices if s == split)
        assert got == list(range(len(got)))  # global indices are dense


def reconstruct(ids, labels, pos, part_a, part_b, special):
    """Part A with each mask replaced by its span (the span's targets minus a final [eop])."""
    spans, current = {}, None
    for i in part_b:
        if ids[i] == special.sop:
            current = pos[i]
            spans[current] = []
        spans[current].append(labels[i])
    text: list[int] = []
    for i in part_a:
        local = i - part_a[0]
        if ids[i] in special.mask_ids and local in spans:
            span = spans[local]
            text += span[:-1] if span and span[-1] == special.eop else span
        else:
            text.append(ids[i])
    return text


def split_on(tokens, sep):
    piece = []
    for t in tokens:
        if t == sep:
            yield piece
            piece = []
        else:
            piece.append(t)
    yield piece


def test_tracked_run_is_in_mlflow(built):
    import mlflow

    tmp, _, out = built
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("data-test").experiment_id])
    manifest = json.loads((out["b"] / "manifest.json").read_text())
    assert run.data.params["seed"] == "1234" and run.data.tags["stage"] == "data"
    assert run.data.metrics["train_rows"] == manifest["splits"]["train"]["rows"]
    assert abs(run.data.metrics["mip_token_share"] - manifest["mip"]["token_share"]) < 1e-9
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "data")]
    assert artifacts == ["data/manifest.json"]


def test_complete_output_is_reused(built, capsys):
    tmp, _, out = built
    before = (out["a"] / "manifest.json").stat().st_mtime_ns
    run(config(tmp, tmp / "corpus", "a"))
    assert "reusing it" in capsys.readouterr().out
    assert (out["a"] / "manifest.json").stat().st_mtime_ns == before


def test_corrupted_corpus_is_counted_and_good_rows_kept(tmp_path, ray_instance, tokenizer):
    corpus = tmp_path / "bad"
    corpus.mkdir()
    good = [f"good document number {i}, long enough to keep." for i in range(7)]
    lines = [
        json.dumps({"text": good[0]}).encode(),
        b'{"text": "truncated json',
        json.dumps({"text": good[1]}).encode(),
        b'{"text": "invalid \xff utf-8"}',
        b"",
        json.dumps({"other": "missing field"}).encode(),
        json.dumps({"text": good[2]}).encode(),
        json.dumps({"text": "y" * 300_000}).encode(),  # one huge line
        json.dumps({"text": "short"}).encode(),
        b"",
    ] + [json.dumps({"text": g}).encode() for g in good[3:]]
    (corpus / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = config(tmp_path, corpus, "out", clean=CleanConfig(min_chars=10, max_chars=100_000),
                 quality=QualityConfig(enabled=False))  # the good rows are short
    cfg.mip = MIPConfig(token_share=0.0)
    cfg.tokenizer = TokenizerSettings(path=str(tokenizer.save(tmp_path)))  # reuse a tokenizer
    cfg.objective = ObjectiveConfig(seq_len=64, mask_window=32)
    m = json.loads((Path(run(cfg)) / "manifest.json").read_text())
    src = m["sources"]["tiny"]
    assert src["rows_read"] == len(lines)
    assert src["rejected"] == {"bad_json": 1, "invalid_utf8": 1, "missing_field": 1, "empty": 2, "too_short": 1,
                               "too_long": 1, "quality": 0, "language": 0, "contaminated": 0, "near_duplicate": 0,
                               "duplicate": 0}
    assert src["kept"] == len(good)
    shutil.rmtree(tmp_path / "out")


def test_missing_input_is_a_clear_error(tmp_path, ray_instance):
    cfg = config(tmp_path, tmp_path / "nowhere", "out")
    with pytest.raises(FileNotFoundError, match="no input files match"):
        run(cfg)
    assert not list(tmp_path.glob("out*"))  # no partial output or staging directory left
