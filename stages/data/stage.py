"""The data stage: corpora + MIP sets -> Parquet shards of the sample schema, tokenizer, manifest.

    read + screen (per file) -> plan (driver: exact and near-duplicates, routing) ->
    apply the plan, weights, split, buckets -> tokenizer (trained on a hash-selected sample,
    or reused) -> tokenize -> blank-infilling rows per (split, bucket); MIP rows per dataset ->
    mix to the MIP token share -> shards written by global index -> manifest -> output moved
    into place.

Ray Data runs the per-row steps in two executions (read + screen; placement + tokenization,
fused into one map; a third when the tokenizer is trained on the placed documents); plain Ray
tasks (`stages.data.blocks`) fetch metadata columns and run the per-group and per-shard steps.
The output is byte-identical for the same config whatever the number of workers, CPUs or
blocks: groups are keyed by content and sorted inside, no count is taken from the cluster,
and each sample's randomness comes from its index and the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import time
import uuid

import numpy as np
import pandas as pd

from glm.schema import COLUMNS
from glm.tokenizer import GLMTokenizer, train_tokenizer
from stages import storage
from stages.cluster import ensure_ray
from stages.data.blank_infilling import KIND_GMASK, KIND_MASK, KIND_MIP
from stages.data.config import DataConfig
from stages.data.documents import REASONS
from stages.data.mix import choose_mip_count, mip_positions, round_robin_rank
from stages.tracking import stage_run

MANIFEST = "manifest.json"


class _Progress:
    def __init__(self, total: int):
        self.total, self.step, self.t0 = total, 0, time.time()

    def __call__(self, message: str) -> None:
        self.step += 1
        print(f"[data {self.step}/{self.total} +{time.time() - self.t0:.1f}s] {message}", flush=True)


def completed_output(cfg: DataConfig) -> dict | None:
    """The manifest of a complete output for this config, if one exists."""
    fs, path = storage.resolve(cfg.output)
    manifest_path = posixpath.join(path, MANIFEST)
    if not storage.exists(fs, manifest_path):
        return None
    manifest = json.loads(storage.read_bytes(fs, manifest_path))
    if manifest.get("config_hash") != cfg.fingerprint():
        return None
    from stages.data.corpus import inputs_fingerprint  # a changed input file rebuilds

    return manifest if manifest.get("inputs") == inputs_fingerprint(cfg) else None


def run(cfg: DataConfig) -> str:
    """Build the output for `cfg` (or reuse a complete one); returns the output URI."""
    if (manifest := completed_output(cfg)) is not None:
        print(f"[data] complete output for config {manifest['config_hash']} exists at {cfg.output}: reusing it")
        return cfg.output
    for uri in [s.uri for s in cfg.sources] + [d.uri for d in cfg.mip.datasets]:
        storage.expand(uri)  # fail on a missing input before starting anything
    out_fs, out_path = storage.resolve(cfg.output)
    staging = f"{out_path}.tmp-{uuid.uuid4().hex[:8]}"
    out_fs.create_dir(staging, recursive=True)
    try:
        _build(cfg, out_fs, out_path, staging)
    finally:
        if storage.exists(out_fs, staging):  # a failed run leaves no partial output behind
            out_fs.delete_dir(staging)
    return cfg.output


def _build(cfg: DataConfig, out_fs, out_path: str, staging: str) -> None:
    import ray.data as rd

    from stages.data import blocks, corpus, steps

    ensure_ray(cfg.workers + 2)
    progress = _Progress(7)

    with stage_run(cfg.tracking.enabled, "data", dataclasses.asdict(cfg), cfg.tracking.experiment,
                   cfg.tracking.tracking_uri) as tracker:
        # 1. read and clean: one verdict per input row (Ray Data execution 1), the plan on the driver
        sources = []
        for s in cfg.sources:
            fs, files = storage.expand(s.uri)
            sources.append({"format": s.format, "text_field": s.text_field, "files": files, "fs": fs})
        reads = [rd.read_binary_files(src["files"], include_paths=True, filesystem=src["fs"]) for src in sources]
        docs = reads[0].union(*reads[1:]) if len(reads) > 1 else reads[0]
        plain_sources = [{k: v for k, v in s.items() if k != "fs"} for s in sources]
        inputs = corpus.inputs_fingerprint(cfg)
        index_path, task_names = _decontam_index(cfg, out_fs, staging)
        docs = docs.map_batches(corpus.parse_and_screen, batch_size=1, fn_kwargs={
            "sources": plain_sources, "clean": dataclasses.asdict(cfg.clean),
            "screen": corpus.screen_settings(cfg, index_path, out_fs)}).materialize()
        meta = blocks.columns(docs, corpus.META_COLUMNS, empty=corpus.SCREEN_SCHEMA)
        plan = corpus.plan(meta, cfg, task_names, cfg.rejected_samples)
        counts = plan.counts
        rows_read = sum(counts.values())
        progress(f"read {rows_read:,} rows from {sum(len(s['files']) for s in sources)} files; "
                 f"rejected {sum(v for (s, r), v in counts.items() if r):,}")

        # 2. exact and near-duplicates removed as planned (first copy in source/path/line order
        #    kept), then source weights, the validation split and hash buckets: fused with the
        #    tokenization (one Ray Data execution) unless the tokenizer is trained on the result
        tasks = rd.TaskPoolStrategy(size=cfg.workers)
        placed = docs.map_batches(corpus.apply_plan, batch_format="pyarrow", compute=tasks, fn_kwargs=plan.kwargs())
        placed = placed.map_batches(steps.assign_buckets, batch_format="numpy", compute=tasks, fn_kwargs={
            "weights": [s.weight for s in cfg.sources], "validation_fraction": cfg.validation_fraction,
            "num_buckets": cfg.num_buckets})
        duplicates = {s: n + counts.get((s, "near_duplicate"), 0) for s, n in plan.duplicates.items()}
        progress(f"kept {sum(v for (s, r), v in counts.items() if not r):,} "
                 f"documents ({sum(duplicates.values()):,} duplicates)")

        # 3. tokenizer
        if not cfg.tokenizer.path:  # trained on a sample of the placed documents, then they are tokenized
            placed = placed.materialize()
        tokenizer = _tokenizer(cfg, placed)
        progress(f"tokenizer: {len(tokenizer):,} pieces ({'reused ' + cfg.tokenizer.path if cfg.tokenizer.path else 'trained'})")

        # 4. tokenize (Ray Data execution 2), then cut rows per (split, bucket) in Ray tasks
        tokenized = placed.map_batches(steps.tokenize, batch_size=64, batch_format="numpy", compute=tasks,
                                       fn_kwargs={"tokenizer_bytes": tokenizer.to_bytes()}).materialize()
        stats = blocks.columns(tokenized, ["source", "split", "bucket", "chars", "n_tokens", "control_strings"]
                               ).to_pandas()
        per_source = stats.groupby("source")
        doc_tokens = {int(k): int(v) for k, v in per_source["n_tokens"].sum().to_dict().items()}
        control_docs = {int(k): int(v) for k, v in per_source["control_strings"].sum().to_dict().items()}
        special = dataclasses.asdict(tokenizer.special)
        rows_dir = f"{staging}/_rows"
        groups = sorted(set(zip(stats["split"].tolist(), stats["bucket"].tolist())))
        in_driver = tokenized.size_bytes() < cfg.driver_bytes  # a near-empty corpus: no more tasks
        meta = _concat(blocks.map_groups(
            tokenized, ["split", "bucket"], groups, steps.build_bucket,
            {"objective": dataclasses.asdict(cfg.objective), "special": special, "seed": cfg.seed,
             "rows_dir": rows_dir, "fs": out_fs}, in_driver), steps.META_SCHEMA)
        progress(f"tokenized {len(stats):,} documents after weights ({int(stats['chars'].sum()) / 1e6:.1f}M "
                 f"characters, {sum(doc_tokens.values()):,} tokens); built {len(meta):,} blank-infilling rows")

        # 5. MIP rows
        mip_meta, mip_stats = meta.iloc[:0], {}
        if cfg.mip.datasets and cfg.mip.token_share > 0:
            mip_meta, mip_stats = _mip(cfg, tokenizer, rows_dir, out_fs)
        progress(f"MIP: {sum(s['rows_built'] for s in mip_stats.values()):,} prompted rows from {len(mip_stats)} datasets")

        # 6. global order (MIP rows mixed in), then every group's file is stamped and split into shards
        index, mix = _global_index(meta, mip_meta, cfg)
        items = []
        for path, rows in pd.concat([meta, mip_meta]).groupby("path", sort=True):
            rows = rows.sort_values("local")
            split, group = rows["split"].iloc[0], int(rows["group"].iloc[0])
            items.append({"path": path, "split": "train" if split == "mip" else split,
                          "stem": f"mip-d{group:05d}" if split == "mip" else f"b{group:05d}",
                          "positions": [index.get((split, group, int(local)), -1) for local in rows["local"]]})
        shards = pd.DataFrame([shard for item in blocks.map_items(steps.finalize_rows, items, {
            "fs": out_fs, "staging": staging, "rows_per_shard": cfg.rows_per_shard}, in_driver) for shard in item],
            columns=steps.SHARD_COLUMNS)
        out_fs.delete_dir(rows_dir)
        progress(f"wrote {len(shards)} shards: {mix['rows']['train']:,} train and {mix['rows']['validation']:,} "
                 f"validation rows; MIP token share {mix['mip_token_share']:.4f} (target {cfg.mip.token_share})")

        # 7. count-model baselines on the validation split, manifest, tokenizer, move into place
        manifest = _manifest(cfg, counts, plan.duplicates, doc_tokens, meta, mip_stats, mix, shards, tokenizer,
                             control_docs)
        corpus.add_to_manifest(manifest, plan, cfg, inputs, corpus.write_side_files(plan, out_fs, staging))
        manifest["baselines"] = _baselines(cfg, out_fs, staging, shards, tokenizer, in_driver)
        if manifest["baselines"]:
            b = manifest["baselines"]
            print(f"[data] validation baselines over {b['tokens']:,} predicted tokens: unigram perplexity "
                  f"{b['unigram_ppl']:.1f}, bigram {b['bigram_ppl']:.1f}", flush=True)
        storage.write_bytes(out_fs, posixpath.join(staging, GLMTokenizer.MODEL_FILE), tokenizer.to_bytes())
        storage.write_bytes(out_fs, posixpath.join(staging, MANIFEST),
                            json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False).encode())
        storage.replace_dir(out_fs, staging, out_path)
        tracker.log_metrics(_flat_metrics(manifest))
        tracker.log_dict(manifest, "data/manifest.json")
        tracker.log_dataset(cfg.output, dataset_name(cfg.output), manifest["config_hash"], context="output")
        tracker.set_tags({"output": cfg.output})
        progress(f"output ready: {cfg.output}")


# --- helpers -----------------------------------------------------------------------------


def _concat(tables: list, schema) -> pd.DataFrame:
    """Per-group metadata tables as one frame (the schema's columns when there is none)."""
    import pyarrow as pa

    return (pa.concat_tables(tables) if tables else schema.empty_table()).to_pandas()


def dataset_name(uri: str) -> str:
    """How the data stage's output is named in MLflow's dataset lineage: its last path parts."""
    return "/".join(uri.rstrip("/").split("/")[-2:])


def _decontam_index(cfg: DataConfig, fs, staging: str) -> tuple[str, list[str]]:
    """The evaluation tasks' n-gram index, written to the staging directory for the workers."""
    if not cfg.decontamination.enabled:
        return "", []
    from stages.data import decontam

    data, names = decontam.cached_index(cfg.decontamination)
    path = posixpath.join(staging, "_rows", "decontam.npz")  # deleted with the rows
    storage.write_bytes(fs, path, data)
    return path, names


def _tokenizer(cfg: DataConfig, placed) -> GLMTokenizer:
    """The configured tokenizer, or one trained on a hash-selected sample of the placed documents
    (then `placed` is a materialized dataset)."""
    if cfg.tokenizer.path:
        return GLMTokenizer.load(cfg.tokenizer.path)
    import pyarrow.compute as pc

    from stages.data import blocks

    total_chars = int(pc.sum(blocks.columns(placed, ["chars"])["chars"]).as_py() or 0)
    fraction = min(1.0, cfg.tokenizer.sample_chars / max(total_chars, 1))
    sample = blocks.columns(placed, ["order", "text"], where=pc.field("draw") < fraction)
    texts = [t for _, t in sorted(zip(sample["order"].to_pylist(), sample["text"].to_pylist()))]
    return train_tokenizer(texts, cfg.tokenizer.vocab_size, character_coverage=cfg.tokenizer.character_coverage)


def _mip(cfg: DataConfig, tokenizer: GLMTokenizer, rows_dir: str, fs):
    import ray.data as rd

    from stages.data import blocks, steps

    datasets, reads = [], []
    for d in cfg.mip.datasets:
        fs, files = storage.expand(d.uri)
        datasets.append({"files": files, "templates": d.templates, "adapter": d.adapter})
        reads.append(rd.read_binary_files(files, include_paths=True, filesystem=fs))
    raw = reads[0].union(*reads[1:]) if len(reads) > 1 else reads[0]
    parsed = raw.map_batches(steps.parse_mip_files, batch_size=1,
                             fn_kwargs={"datasets": datasets, "seed": cfg.seed}).materialize()
    reasons = blocks.columns(parsed, ["dataset", "reason"], empty=steps.MIP_SCHEMA).to_pandas()
    reasons = reasons.groupby(["dataset", "reason"]).size().to_dict()
    with_rows = sorted((int(d),) for (d, r) in reasons if r == "")  # datasets with usable rows
    meta = _concat(blocks.map_groups(
        parsed, ["dataset"], with_rows, steps.build_mip,
        {"objective": dataclasses.asdict(cfg.objective), "caps": [d.cap for d in cfg.mip.datasets],
         "tokenizer_bytes": tokenizer.to_bytes(), "rows_dir": rows_dir, "fs": fs},
        parsed.size_bytes() < cfg.driver_bytes), steps.META_SCHEMA)
    per_dataset = meta.groupby("group")["samples"].agg(["sum", "size"])
    stats = {}
    for i, d in enumerate(cfg.mip.datasets):
        usable = reasons.get((i, ""), 0)
        samples = int(per_dataset["sum"].get(i, 0))
        stats[d.name] = {
            "rows_read": sum(v for (ds, _), v in reasons.items() if ds == i),
            "rejected": {r: v for (ds, r), v in reasons.items() if ds == i and r},
            "over_cap": max(0, usable - d.cap), "answer_too_long": min(usable, d.cap) - samples,
            "samples": samples, "rows_built": int(per_dataset["size"].get(i, 0)),
        }
    return meta, stats


def _global_index(meta, mip_meta, cfg: DataConfig):
    """Global position of every row: (split, group, local) -> index; MIP rows placed by `mix`."""
    index: dict[tuple[str, int, int], int] = {}
    rows, share, mip_tokens = {}, 0.0, 0
    for split in ("train", "validation"):
        part = meta[meta["split"] == split]
        counts = part.groupby("group").size().to_dict()
        ranks = round_robin_rank(part["group"].to_numpy(), part["local"].to_numpy(), counts) if len(part) else []
        order = np.argsort(ranks) if len(part) else []
        keys = list(zip(part["group"].to_numpy()[order].tolist(), part["local"].to_numpy()[order].tolist()))
        if split == "train" and len(mip_meta):
            mcounts = mip_meta.groupby("group").size().to_dict()
            mranks = round_robin_rank(mip_meta["group"].to_numpy(), mip_meta["local"].to_numpy(), mcounts)
            morder = np.argsort(mranks)
            mtokens = mip_meta["tokens"].to_numpy()[morder]
            m = choose_mip_count(int(part["tokens"].sum()), mtokens, cfg.mip.token_share)
            mkeys = list(zip(mip_meta["group"].to_numpy()[morder].tolist()[:m],
                             mip_meta["local"].to_numpy()[morder].tolist()[:m]))
            is_mip = np.zeros(len(keys) + m, dtype=bool)
            is_mip[mip_positions(len(keys), m, cfg.mip.warmup_rows)] = True
            ss, mp = iter(keys), iter(mkeys)
            for pos, flag in enumerate(is_mip):
                index[("mip", *next(mp)) if flag else (split, *next(ss))] = pos
            share = float(mtokens[:m].sum() / (part["tokens"].sum() + mtokens[:m].sum())) if m else 0.0
            mip_tokens = int(mtokens[:m].sum())
            rows[split] = len(is_mip)
            rows["mip"] = m
        else:
            for pos, key in enumerate(keys):
                index[(split, *key)] = pos
            rows[split] = len(keys)
    rows.setdefault("mip", 0)
    return index, {"rows": rows, "mip_token_share": share, "mip_tokens": mip_tokens}


def _manifest(cfg, counts, duplicates, doc_tokens, meta, mip_stats, mix, shards, tokenizer, control_docs) -> dict:
    sources = {}
    for i, s in enumerate(cfg.sources):
        rejected = {r: counts.get((i, r), 0) for r in REASONS if r != "duplicate"}
        rejected["duplicate"] = duplicates.get(i, 0)
        read = sum(v for (src, _), v in counts.items() if src == i)
        sources[s.name] = {"language": s.language, "weight": s.weight, "rows_read": read,
                           "kept": read - sum(rejected.values()), "rejected": rejected,
                           "tokens": doc_tokens.get(i, 0),
                           # documents (after weights) holding "[eop]", "[MASK]", "</s>" ... as text:
                           # encoded as plain text, never as control tokens
                           "documents_with_control_strings": control_docs.get(i, 0)}
    train = meta[meta["split"] == "train"]
    mask_rows = train[train["kind"] == KIND_MASK]
    text_in_mask = int(mask_rows["text_tokens"].sum())
    return {
        "config_hash": cfg.fingerprint(),
        "seed": cfg.seed,
        "tokenizer": {"sha256": hashlib.sha256(tokenizer.to_bytes()).hexdigest(), "pieces": len(tokenizer),
                      "special": dataclasses.asdict(tokenizer.special)},
        "schema": {"columns": list(COLUMNS), "seq_len": cfg.objective.seq_len,
                   "position_encoding": cfg.objective.position_encoding, "extra": ["index", "kind"],
                   "kind": {"gmask": KIND_GMASK, "mask": KIND_MASK, "mip": KIND_MIP}},
        "sources": sources,
        "mip": {"datasets": mip_stats, "target_token_share": cfg.mip.token_share,
                "token_share": mix["mip_token_share"], "rows": mix["rows"]["mip"], "warmup_rows": cfg.mip.warmup_rows},
        "splits": {split: {"rows": mix["rows"][split],
                           "tokens": int(meta[meta["split"] == split]["tokens"].sum()) + (mix["mip_tokens"] if split == "train" else 0),
                           "shards": [{"file": r.file, "rows": int(r.rows), "first_index": int(r.first_index),
                                       "last_index": int(r.last_index), "sha256": r.sha256}
                                      for r in shards[shards["split"] == split].sort_values("file").itertuples()]}
                   for split in ("train", "validation")},
        "objective": {"rows_mask": int((train["kind"] == KIND_MASK).sum()), "rows_gmask": int((train["kind"] == KIND_GMASK).sum()),
                      "mask_coverage": (int(mask_rows["span_tokens"].sum()) / text_in_mask) if text_in_mask else 0.0,
                      "mean_span_length": (int(mask_rows["span_tokens"].sum()) / int(mask_rows["span_count"].sum()))
                      if len(mask_rows) else 0.0},
    }


def _baselines(cfg: DataConfig, fs, staging: str, shards, tokenizer: GLMTokenizer, in_driver: bool) -> dict:
    """Unigram and bigram count models fitted on the training rows' predicted tokens, their
    perplexity on the validation rows' predicted tokens (`stages.data.baselines`); each shard's
    (previous token, target) pairs are read in a task of its own, concatenated in file order."""
    from stages.data import blocks
    from stages.data.baselines import pair_baselines, shard_pairs

    files = {split: sorted(shards[shards["split"] == split]["file"]) for split in ("train", "validation")}
    if not files["train"] or not files["validation"]:
        return {}
    special = tokenizer.special
    kwargs = {"fs": fs, "root": staging, "seq_len": cfg.objective.seq_len, "mask_ids": special.mask_ids,
              "sop": special.sop}
    pairs = {}
    for split, names in files.items():
        parts = blocks.map_items(shard_pairs, names, kwargs, in_driver)
        pairs[split] = tuple(np.concatenate([p[i] for p in parts]) for i in (0, 1))
    result = pair_baselines(pairs["train"], pairs["validation"], len(tokenizer))
    return {**result, "fitted_on": "predicted tokens of the train split",
            "scored_on": "predicted tokens of the validation split"} if result else {}


def _flat_metrics(manifest: dict) -> dict[str, float]:
    out = {"mip_token_share": manifest["mip"]["token_share"], "mip_rows": manifest["mip"]["rows"]}
    for kind, value in manifest.get("baselines", {}).items():
        if kind.endswith("_ppl"):
            out[f"validation_{kind}"] = value
    for split, s in manifest["splits"].items():
        out[f"{split}_rows"], out[f"{split}_tokens"] = s["rows"], s["tokens"]
    for name, s in manifest["sources"].items():
        key = "".join(c if c.isalnum() else "_" for c in name)[-60:]
        out[f"source.{key}.kept"] = s["kept"]
        out[f"source.{key}.rejected"] = sum(s["rejected"].values())
    return out
