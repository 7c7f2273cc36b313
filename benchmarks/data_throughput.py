"""Data stage throughput: the Ray Data pipeline (2 tokenizer workers) against the same per-row
code run serially in one process without Ray, on the same corpus, in the same run.

    python benchmarks/data_throughput.py [--corpus GLOB] [--repeat N] [--workers 2] [--vocab-size 32000]

Both sides get the same pre-trained tokenizer (training it is serial in both) and MIP is off;
Ray start-up is timed separately (a cluster is already up when a job runs). --repeat N gives
the source weight N: each document is tokenized and laid out N times (distinct copies in
distinct buckets) on both sides, for a workload larger than the shipped corpus. Prints progress,
then one JSON line: tokens_per_s, baseline_tokens_per_s, ratio, goal, spm_encode_share, ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.fs  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm.tokenizer import GLMTokenizer, train_tokenizer  # noqa: E402
from stages import storage  # noqa: E402
from stages.data import steps  # noqa: E402
from stages.data.config import CorpusSource, DataConfig, MIPConfig, ObjectiveConfig, TokenizerSettings  # noqa: E402

GOAL = 1.5


def default_corpus() -> str:
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pretrain"
    return str(shared / "*.jsonl") if shared.exists() else "data/sample/pretrain/*.jsonl"


def serial(cfg: DataConfig, tokenizer: GLMTokenizer, work: Path) -> dict:
    """The stage's per-row and per-group functions, called in order in this process (rows are
    written and stamped into shards as the stage does)."""
    t0 = time.perf_counter()
    fs, files = storage.expand(cfg.sources[0].uri)
    source = {"format": "auto", "text_field": "text", "files": files}
    docs = pa.concat_tables(
        steps.parse_files({"bytes": [storage.read_bytes(fs, f)], "path": [f]}, [source], dataclasses.asdict(cfg.clean))
        for f in files)
    good = docs.filter(pa.compute.equal(docs["reason"], ""))
    seen: set[int] = set()  # files are read in order, so the first copy is the one kept
    duplicate = []
    for h in good["doc_hash"].to_pylist():
        duplicate.append(h in seen)
        seen.add(h)
    marked = good.append_column("duplicate", pa.array(duplicate))
    placed = steps.assign_buckets(marked.to_pydict(), [cfg.sources[0].weight], cfg.validation_fraction,
                                  cfg.num_buckets)
    placed = placed.filter(pa.compute.greater_equal(placed["bucket"], 0))
    t_encode = time.perf_counter()
    tokenize = steps.Tokenize(tokenizer.to_bytes())
    tokenized = pa.concat_tables(tokenize(placed.slice(i, 64).to_pydict()) for i in range(0, placed.num_rows, 64))
    t_encode = time.perf_counter() - t_encode
    groups = defaultdict(list)
    for i, key in enumerate(zip(tokenized["split"].to_pylist(), tokenized["bucket"].to_pylist())):
        groups[key].append(i)
    special = dataclasses.asdict(tokenizer.special)
    local = pa.fs.LocalFileSystem()
    rows = 0
    for idx in groups.values():
        meta = steps.build_bucket(tokenized.take(idx), dataclasses.asdict(cfg.objective), special, cfg.seed,
                                  str(work / "serial_rows"), local)
        rows += meta.num_rows
        item = {"path": meta["path"][0].as_py(), "split": meta["split"][0].as_py(), "stem": "b",
                "positions": list(range(meta.num_rows))}
        steps.finalize_rows(item, local, str(work / "serial_out"), cfg.rows_per_shard)
    return {"seconds": time.perf_counter() - t0, "tokens": int(pa.compute.sum(tokenized["n_tokens"]).as_py()),
            "rows": rows, "encode_seconds": t_encode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=default_corpus(), help="glob of JSONL files with a 'text' field")
    parser.add_argument("--repeat", type=int, default=1, help="source weight: use every document N times")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="data_bench_"))
    try:
        fs, files = storage.expand(args.corpus)
        print(f"corpus: {args.corpus} ({len(files)} files, "
              f"{sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB)", flush=True)
        t = time.perf_counter()
        texts = [json.loads(line)["text"] for f in files for line in open(f, encoding="utf-8")]
        tokenizer = train_tokenizer(texts, args.vocab_size)
        tok_path = tokenizer.save(work)
        print(f"tokenizer: {len(tokenizer)} pieces trained in {time.perf_counter() - t:.0f}s (shared by both runs)", flush=True)

        cfg = DataConfig(sources=[CorpusSource(uri=args.corpus, weight=float(args.repeat))], output=str(work / "out"),
                         tokenizer=TokenizerSettings(path=str(tok_path)),
                         objective=ObjectiveConfig(seq_len=args.seq_len, mask_window=args.seq_len // 4),
                         mip=MIPConfig(token_share=0.0), workers=args.workers)

        print("baseline: the same per-row code, serially, without Ray ...", flush=True)
        base = serial(cfg, tokenizer, work)
        print(f"  {base['tokens']:,} tokens, {base['rows']:,} rows in {base['seconds']:.1f}s "
              f"(SentencePiece encode {base['encode_seconds']:.1f}s)", flush=True)

        import ray

        from stages.cluster import ensure_ray
        from stages.data.stage import run

        t = time.perf_counter()
        ensure_ray(args.workers + 2)
        ray_start = time.perf_counter() - t
        print(f"Ray started in {ray_start:.1f}s ({ray.cluster_resources().get('CPU')} logical CPUs); "
              f"stage with {args.workers} workers ...", flush=True)
        t = time.perf_counter()
        run(cfg)
        stage_seconds = time.perf_counter() - t
        manifest = json.loads((work / "out" / "manifest.json").read_text())
        tokens = sum(s["tokens"] for s in manifest["sources"].values())
        rows = manifest["splits"]["train"]["rows"] + manifest["splits"]["validation"]["rows"]
        assert tokens == base["tokens"] and rows == base["rows"], "the two runs processed different data"
        result = {
            "benchmark": "data_throughput", "corpus": args.corpus, "repeat": args.repeat, "workers": args.workers,
            "cpus": os.cpu_count(),
            "tokens": tokens, "rows": rows,
            "tokens_per_s": round(tokens / stage_seconds), "stage_seconds": round(stage_seconds, 2),
            "baseline_tokens_per_s": round(base["tokens"] / base["seconds"]), "baseline_seconds": round(base["seconds"], 2),
            "ratio": round(base["seconds"] / stage_seconds, 3), "goal": GOAL,
            "spm_encode_share": round(base["encode_seconds"] / base["seconds"], 3),
            "ray_start_seconds": round(ray_start, 2),
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
