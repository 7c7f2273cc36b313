"""Near-duplicate removal quality: the data stage against datasketch's MinHash LSH, on a corpus
with injected duplicates of known origin.

    python benchmarks/dedup_quality.py --corpus 'data/sample/pretrain/*.jsonl' [--seed 0]

A copy of the corpus gets exact copies of `--exact` of its documents and near copies of
`--near` of them (each near copy: 1-10% of its words edited (characters for Chinese), or its
paragraphs reordered, or boilerplate added at both ends). The stage runs on it (quality,
language and decontamination off, so only de-duplication removes documents) with 1 and with 2
workers; datasketch's MinHashLSH (same threshold and signature length, candidates joined by
union-find, the first document of a cluster kept) runs on the same documents in the same run.

- recall: injected copies whose exact Jaccard similarity with their original (on the stage's
  shingles) is >= 0.8 that end in their original's cluster, over all such copies;
- precision: removed documents that are true duplicates of the document kept for their
  cluster (an injected copy of it, its original, or any pair at exact Jaccard >= 0.8), over
  all removed documents;
- kept_identical_across_workers: 1 and 2 workers keep the same documents (and the cluster
  files are byte-identical); seconds: the stage's wall time with 2 workers (Ray up already).

Prints progress, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages import storage  # noqa: E402
from stages.data import dedup  # noqa: E402
from stages.data.shingles import cjk_share, tokens  # noqa: E402

GOAL = {"precision": 0.99, "recall": 0.9}
BOILERPLATE = {
    "en": ("Subscribe to our newsletter for the latest updates. All rights reserved. Terms of use and "
           "privacy policy apply to this page.", "Share this article with your friends. Cookies help us "
           "deliver our services; by using them you agree to our use of cookies."),
    "zh": ("欢迎订阅本站新闻，获取最新资讯。版权所有，未经许可不得转载。", "分享到微信朋友圈。本网站使用cookie以提供更好的服务，继续浏览即表示同意。"),
}


def load(pattern: str) -> list[str]:
    fs, files = storage.expand(pattern)
    texts = []
    for f in files:
        for line in storage.read_bytes(fs, f).decode("utf-8").splitlines():
            try:
                t = json.loads(line).get("text")
            except json.JSONDecodeError:
                continue
            if isinstance(t, str) and t.strip():
                texts.append(t)
    return texts


def near_copy(text: str, rng: random.Random, vocab: list[str], cjk_chars: list[str]) -> tuple[str, str]:
    zh = cjk_share(tokens(text)) >= 0.5
    kind = rng.choice(["edit", "edit", "reorder", "boilerplate"])
    if kind == "reorder":
        paras = text.split("\n")
        if len(paras) >= 3:
            rng.shuffle(paras)
            return "\n".join(paras), kind
        kind = "edit"
    if kind == "boilerplate":
        head, tail = BOILERPLATE["zh" if zh else "en"]
        return f"{head}\n{text}\n{tail}", kind
    share = rng.uniform(0.01, 0.10)
    if zh:
        chars = list(text)
        idx = [i for i, c in enumerate(chars) if cjk_share([c]) == 1.0]
        for i in rng.sample(idx, max(1, int(len(idx) * share))):
            chars[i] = rng.choice(cjk_chars)
        return "".join(chars), kind
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * share))):
        words[i] = rng.choice(vocab)
    return " ".join(words), kind


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def metrics(kept_of: list[int], origin: list[int], sets: list[np.ndarray]) -> dict:
    """kept_of[i]: the document kept for i's cluster (i itself when kept); origin[i]: the original
    an injected copy was made from (i for an original)."""
    removed = [i for i, k in enumerate(kept_of) if k != i]
    good = 0
    for i in removed:
        k = kept_of[i]
        if origin[i] == origin[k] or jaccard(sets[i], sets[k]) >= 0.8:
            good += 1
    truth = [i for i in range(len(origin)) if origin[i] != i and jaccard(sets[i], sets[origin[i]]) >= 0.8]
    found = sum(1 for i in truth if kept_of[i] == kept_of[origin[i]])
    injected = [i for i in range(len(origin)) if origin[i] != i]
    return {"precision": round(good / len(removed), 4) if removed else 1.0,
            "recall": round(found / len(truth), 4) if truth else 1.0,
            "recall_all_injected": round(sum(1 for i in injected if kept_of[i] == kept_of[origin[i]]) / len(injected), 4),
            "removed": len(removed), "true_pairs": len(truth)}


def datasketch_clusters(sets: list[np.ndarray], threshold: float, num_perm: int) -> tuple[list[int], float]:
    from datasketch import MinHash, MinHashLSH

    t = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    hashes = []
    for i, s in enumerate(sets):
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([v.tobytes() for v in s])
        hashes.append(m)
        lsh.insert(i, m)
    uf = dedup.UnionFind(len(sets))
    for i, m in enumerate(hashes):
        for j in lsh.query(m):
            uf.union(i, int(j))
    roots = uf.roots()
    return roots.tolist(), time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/sample/pretrain/*.jsonl", help="glob of JSONL files with 'text'")
    parser.add_argument("--exact", type=float, default=0.05, help="share of documents copied exactly")
    parser.add_argument("--near", type=float, default=0.15, help="share of documents copied with edits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    originals = load(args.corpus)
    n = len(originals)
    vocab = sorted({w for t in originals[:200] for w in t.split(" ") if w.isalpha()}) or ["word"]
    cjk = sorted({c for t in originals[:200] for c in t if cjk_share([c]) == 1.0}) or ["字"]
    texts, origin, kinds = list(originals), list(range(n)), {}
    for i in rng.sample(range(n), int(n * args.exact)):
        texts.append(originals[i])
        origin.append(i)
        kinds["exact"] = kinds.get("exact", 0) + 1
    for i in rng.sample(range(n), int(n * args.near)):
        copy, kind = near_copy(originals[i], rng, vocab, cjk)
        texts.append(copy)
        origin.append(i)
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"corpus: {args.corpus}: {n} documents + {len(texts) - n} injected {kinds}", flush=True)

    from stages.data.config import (CleanConfig, CorpusSource, DataConfig, MIPConfig, ObjectiveConfig,
                                    TokenizerSettings)
    from stages.data.decontam import DecontamConfig
    from stages.data.langid import LanguageConfig
    from stages.data.quality import QualityConfig

    work = Path(tempfile.mkdtemp(prefix="dedup_bench_"))
    try:
        # originals first, copies after: (file, line) order keeps the originals
        with open(work / "a_corpus.jsonl", "w", encoding="utf-8") as f:
            for t in texts[:n]:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        with open(work / "b_injected.jsonl", "w", encoding="utf-8") as f:
            for t in texts[n:]:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        position = {(str(work / "a_corpus.jsonl"), k + 1): k for k in range(n)}
        position.update({(str(work / "b_injected.jsonl"), k + 1): n + k for k in range(len(texts) - n)})
        dd = dedup.DedupConfig()
        sets = [dedup.shingles(t, dd.shingle_size) for t in texts]

        from glm.tokenizer import train_tokenizer

        tok = train_tokenizer(originals[::max(1, n // 100)], 4000, character_coverage=0.98).save(work)

        def config(out: str, workers: int) -> DataConfig:
            return DataConfig(
                sources=[CorpusSource(uri=str(work / "*.jsonl"), name="corpus", language="any")],
                output=str(work / out), clean=CleanConfig(min_chars=1), tokenizer=TokenizerSettings(path=str(tok)),
                objective=ObjectiveConfig(seq_len=256, mask_window=64), mip=MIPConfig(token_share=0.0),
                quality=QualityConfig(enabled=False), language=LanguageConfig(enabled=False),
                decontamination=DecontamConfig(enabled=False), dedup=dd, num_buckets=4, workers=workers)

        from stages.cluster import ensure_ray
        from stages.data.stage import run

        ensure_ray(4)
        results = {}
        for workers in (1, 2):
            t = time.perf_counter()
            out = Path(run(config(f"out{workers}", workers)))
            results[workers] = {"seconds": time.perf_counter() - t,
                                "clusters": pq.read_table(out / "dedup_clusters.parquet").to_pylist(),
                                "bytes": (out / "dedup_clusters.parquet").read_bytes()}
            print(f"stage with {workers} worker(s): {results[workers]['seconds']:.1f}s", flush=True)
        kept_of = list(range(len(texts)))
        keeper = {}
        for c in results[2]["clusters"]:
            if c["kept"]:
                keeper[c["cluster"]] = position[(c["path"], c["line"])]
        for c in results[2]["clusters"]:
            kept_of[position[(c["path"], c["line"])]] = keeper[c["cluster"]]
        removed = {w: sorted((c["path"], c["line"]) for c in r["clusters"] if not c["kept"]) for w, r in results.items()}
        stage = metrics(kept_of, origin, sets)

        roots, ds_seconds = datasketch_clusters(sets, dd.threshold, dd.num_perm)
        reference = metrics(roots, origin, sets)
        print(f"datasketch MinHashLSH: {ds_seconds:.1f}s", flush=True)

        load_avg = os.getloadavg()
        result = {
            "benchmark": "dedup_quality", "corpus": args.corpus, "documents": n, "injected": len(texts) - n,
            "injected_kinds": kinds, "threshold": dd.threshold, "num_perm": dd.num_perm, "bands": dd.bands,
            **stage, "kept_identical_across_workers": removed[1] == removed[2] and results[1]["bytes"] == results[2]["bytes"],
            "seconds": round(results[2]["seconds"], 2),
            "datasketch": {**{k: reference[k] for k in ("precision", "recall", "recall_all_injected", "removed")},
                           "seconds": round(ds_seconds, 2)},
            "goal": GOAL, "goal_met": stage["precision"] >= GOAL["precision"] and stage["recall"] >= GOAL["recall"],
            "cpus": os.cpu_count(), "load_avg_1m": round(load_avg[0], 1),
        }
        print(json.dumps(result, ensure_ascii=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
