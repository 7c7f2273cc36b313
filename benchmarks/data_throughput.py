"""Data stage throughput: the Ray Data pipeline (2 tokenizer workers) against the same per-row
code run serially in one process without Ray, on the same corpus, in the same run.

    python benchmarks/data_throughput.py [--corpus GLOB] [--repeat N] [--workers 2] [--vocab-size 32000]

Both sides get the same pre-trained tokenizer (training it is serial in both) and MIP is off;
both screen every document the same way (quality rules, language ID, decontamination against
the shipped tasks, MinHash near-duplicate planning) and fit the manifest's count-model
baselines on the shards they wrote. Ray start-up is timed separately (a
cluster is already up when a job runs). --repeat N gives the source weight N: each document is
tokenized and laid out N times (distinct copies in distinct buckets) on both sides, for a
workload larger than the shipped corpus. Prints progress, then one JSON line: tokens_per_s,
baseline_tokens_per_s, ratio, goal, spm_encode_share, ray_data_first_use_seconds (a cluster's
first Ray Data execution starts Ray Data's detached stats and autoscaling actors, which live as
long as the cluster: timed apart, like Ray's start), fixed_seconds (the stage on the corpus's
first --fixed-docs documents after that: its fixed costs), tokens_per_s_per_core, step_share (the stage's
wall time per step), baseline_step_share, load_avg_1m (the machine's load while measuring) ...
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
from stages.data.baselines import read_split, split_baselines  # noqa: E402
from stages.data.config import CorpusSource, DataConfig, MIPConfig, ObjectiveConfig, TokenizerSettings  # noqa: E402

GOAL = 1.5


def default_corpus() -> str:
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pretrain"
    return str(shared / "*.jsonl") if shared.exists() else "data/sample/pretrain/*.jsonl"


def serial(cfg: DataConfig, tokenizer: GLMTokenizer, work: Path) -> dict:
    """The stage's per-row and per-group functions, called in order in this process (rows are
    written and stamped into shards as the stage does)."""
    from stages.data import corpus, decontam

    t0 = time.perf_counter()
    marks = {}
    local = pa.fs.LocalFileSystem()
    index_path, names = "", []
    if cfg.decontamination.enabled:
        index = decontam.build_index(cfg.decontamination)
        index_path, names = str(work / "serial_decontam.npz"), index["names"]
        storage.write_bytes(local, index_path, decontam.to_bytes(index))
    fs, files = storage.expand(cfg.sources[0].uri)
    source = {"format": "auto", "text_field": "text", "files": files}
    settings = corpus.screen_settings(cfg, index_path, local)
    docs = pa.concat_tables(
        corpus.parse_and_screen({"bytes": [storage.read_bytes(fs, f)], "path": [f]}, [source],
                                dataclasses.asdict(cfg.clean), settings)
        for f in files)
    marks["read+screen"] = time.perf_counter()
    plan = corpus.plan(docs.select(corpus.META_COLUMNS), cfg, names)
    good = docs.filter(pa.compute.equal(docs["reason"], ""))
    marked = corpus.apply_plan(good, **plan.kwargs())
    placed = steps.assign_buckets(marked.to_pydict(), [cfg.sources[0].weight], cfg.validation_fraction,
                                  cfg.num_buckets)
    placed = placed.filter(pa.compute.greater_equal(placed["bucket"], 0))
    marks["dedup+place"] = time.perf_counter()
    t_encode = time.perf_counter()
    model = tokenizer.to_bytes()
    tokenized = pa.concat_tables(steps.tokenize(placed.slice(i, 64).to_pydict(), model)
                                 for i in range(0, placed.num_rows, 64))
    t_encode = time.perf_counter() - t_encode
    groups = defaultdict(list)
    for i, key in enumerate(zip(tokenized["split"].to_pylist(), tokenized["bucket"].to_pylist())):
        groups[key].append(i)
    special = dataclasses.asdict(tokenizer.special)
    rows = 0
    metas = []
    for idx in groups.values():
        meta = steps.build_bucket(tokenized.take(idx), dataclasses.asdict(cfg.objective), special, cfg.seed,
                                  str(work / "serial_rows"), local)
        rows += meta.num_rows
        metas.append(meta)
    marks["tokenize+blank_infilling"] = time.perf_counter()
    shards = []
    for n, meta in enumerate(metas):
        item = {"path": meta["path"][0].as_py(), "split": meta["split"][0].as_py(), "stem": f"b{n:05d}",
                "positions": list(range(meta.num_rows))}
        shards += steps.finalize_rows(item, local, str(work / "serial_out"), cfg.rows_per_shard)
    marks["shards"] = time.perf_counter()
    files = {split: sorted(s["file"] for s in shards if s["split"] == split) for split in ("train", "validation")}
    if files["train"] and files["validation"]:  # the count-model baselines the stage's manifest holds
        arrays = {split: read_split(local, str(work / "serial_out"), f, cfg.objective.seq_len)
                  for split, f in files.items()}
        split_baselines(arrays["train"], arrays["validation"], len(tokenizer), tokenizer.special.mask_ids,
                        tokenizer.special.sop)
    marks["baselines"] = time.perf_counter()
    total = marks["baselines"] - t0
    shares, last = {}, t0
    for name, t in marks.items():
        shares[name], last = round((t - last) / total, 3), t
    return {"seconds": total, "tokens": int(pa.compute.sum(tokenized["n_tokens"]).as_py()),
            "rows": rows, "encode_seconds": t_encode, "step_share": shares}


# the stage's progress steps (its de-duplication plan ends step 1; with a given tokenizer the
# placement runs fused with the tokenization, in step 4)
STEP_NAMES = {1: "read+screen+plan", 2: "place", 3: "tokenizer", 4: "place+tokenize+blank_infilling", 5: "mip",
              6: "shards", 7: "manifest"}


def timed_run(cfg: DataConfig) -> tuple[float, dict]:
    """The stage's wall time and its share per step (from its progress lines, echoed)."""
    import contextlib
    import io
    import re

    from stages.data.stage import run

    buffer = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buffer):
        run(cfg)
    seconds = time.perf_counter() - t
    marks = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"\[data (\d+)/\d+ \+([\d.]+)s\]", buffer.getvalue())}
    print("\n".join(l for l in buffer.getvalue().splitlines() if l.startswith("[data")), flush=True)
    shares, last = {}, 0.0
    for step in sorted(marks):
        shares[STEP_NAMES.get(step, str(step))], last = round((marks[step] - last) / seconds, 3), marks[step]
    shares["other"] = round(1 - last / seconds, 3)  # input checks, staging, before the first step
    return seconds, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=default_corpus(), help="glob of JSONL files with a 'text' field")
    parser.add_argument("--repeat", type=int, default=1, help="source weight: use every document N times")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--language", default="en,zh", help="the corpus's language tag(s) for language ID")
    parser.add_argument("--fixed-docs", type=int, default=8, help="documents of the fixed-cost run")
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

        cfg = DataConfig(sources=[CorpusSource(uri=args.corpus, weight=float(args.repeat), language=args.language)],
                         output=str(work / "out"), tokenizer=TokenizerSettings(path=str(tok_path)),
                         objective=ObjectiveConfig(seq_len=args.seq_len, mask_window=args.seq_len // 4),
                         mip=MIPConfig(token_share=0.0), workers=args.workers)
        (work / "small").mkdir()
        with open(work / "small" / "docs.jsonl", "w", encoding="utf-8") as f:
            for t in texts[:args.fixed_docs]:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        small = dataclasses.replace(cfg, sources=[CorpusSource(uri=str(work / "small" / "docs.jsonl"),
                                                               language=args.language)], output=str(work / "small_out"))

        print("baseline: the same per-row code, serially, without Ray ...", flush=True)
        base = serial(cfg, tokenizer, work)
        print(f"  {base['tokens']:,} tokens, {base['rows']:,} rows in {base['seconds']:.1f}s "
              f"(SentencePiece encode {base['encode_seconds']:.1f}s)", flush=True)

        import ray
        import ray.data

        from stages.cluster import ensure_ray

        t = time.perf_counter()
        ensure_ray(args.workers + 2)
        ray_start = time.perf_counter() - t
        print(f"Ray started in {ray_start:.1f}s ({ray.cluster_resources().get('CPU')} logical CPUs); "
              f"stage with {args.workers} workers ...", flush=True)
        t = time.perf_counter()
        ray.data.range(1).materialize()  # a cluster's first Ray Data execution starts Ray Data's detached actors
        first_use = time.perf_counter() - t
        print(f"Ray Data's first use on this cluster (its stats and autoscaling actors): {first_use:.1f}s", flush=True)
        fixed_seconds, _ = timed_run(small)
        print(f"  fixed costs: the stage on {args.fixed_docs} documents took {fixed_seconds:.1f}s", flush=True)
        load_before = os.getloadavg()[0]
        stage_seconds, step_share = timed_run(cfg)
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
            "ray_start_seconds": round(ray_start, 2), "ray_data_first_use_seconds": round(first_use, 2),
            "fixed_seconds": round(fixed_seconds, 2), "fixed_docs": args.fixed_docs,
            "tokens_per_s_per_core": round(tokens / stage_seconds / (os.cpu_count() or 1)),
            "step_share": step_share, "baseline_step_share": base["step_share"],
            "load_avg_1m": round((load_before + os.getloadavg()[0]) / 2, 1),
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
