"""The per-row and per-group work of the data stage, as functions Ray Data (per row) and Ray
tasks (per group, `stages.data.blocks`) run on workers.

Each returns a pyarrow Table. None of them depends on how rows were partitioned: groups are
sorted by a content key before use, and randomness comes from index-seeded RNGs.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from glm.schema import COLUMNS, layout_prompted
from glm.tokenizer import GLMTokenizer
from stages.data.blank_infilling import KIND_MIP, BlankInfillingBuilder, pack_prompted, sample_rng
from stages.data.config import CleanConfig, ObjectiveConfig
from stages.data.documents import doc_hash, file_format, parse_file
from stages.data.mip import load_templates, prompted_pair

HASH_SPACE = 1 << 20


def _hash_fraction(h: int, salt: int) -> float:
    """A uniform [0, 1) number from a document hash (independent draws for different salts)."""
    return ((h >> (salt * 20)) % HASH_SPACE) / HASH_SPACE


def parse_files(batch: dict, sources: list[dict], clean: dict) -> pa.Table:
    """read_binary_files batch (bytes, path) -> one row per input row with its verdict."""
    cfg = CleanConfig(**clean)
    rows = []
    for data, path in zip(batch["bytes"], batch["path"]):
        source = next(i for i, s in enumerate(sources) if path in s["files"])
        s = sources[source]
        rows += parse_file(bytes(data), path, source, file_format(path, s["format"]), s["text_field"], cfg)
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


DOC_SCHEMA = pa.schema([("source", pa.int32()), ("path", pa.string()), ("line", pa.int64()),
                        ("text", pa.string()), ("reason", pa.string()), ("doc_hash", pa.int64())])


def assign_buckets(batch: dict, weights: list[float], validation_fraction: float, num_buckets: int) -> pa.Table:
    """Apply source weights (copies), the validation split and the bucket, all from the content hash.

    A duplicate keeps one row with bucket -1, so it can be counted and then dropped.
    """
    out = {"text": [], "source": [], "split": [], "bucket": [], "order": [], "chars": [], "draw": []}
    for text, source, h, dup in zip(batch["text"], batch["source"], batch["doc_hash"], batch["duplicate"]):
        h, w = int(h), weights[int(source)]
        copies = int(w) + (1 if _hash_fraction(h, 0) < w - int(w) else 0)
        split = "validation" if _hash_fraction(h, 1) < validation_fraction else "train"
        if dup:
            for column, value in zip(out, ("", int(source), split, -1, h, 0, 1.0)):
                out[column].append(value)
            continue
        for copy in range(copies):
            key = doc_hash(f"{h}:{copy}") if copy else h
            out["text"].append(str(text))
            out["source"].append(int(source))
            out["split"].append(split)
            out["bucket"].append(key % num_buckets)
            out["order"].append(key)
            out["chars"].append(len(text))
            out["draw"].append(_hash_fraction(key, 2))  # selects the tokenizer's training sample
    return pa.table(out)


_TOKENIZER: dict = {}  # model bytes -> GLMTokenizer: loaded once per worker process


def tokenizer_of(model: bytes) -> GLMTokenizer:
    """The tokenizer of a SentencePiece model, loaded once per process (the last one used)."""
    tokenizer = _TOKENIZER.get(model)
    if tokenizer is None:
        _TOKENIZER.clear()
        tokenizer = _TOKENIZER[model] = GLMTokenizer(model)
    return tokenizer


def tokenize(batch: dict, tokenizer_bytes: bytes) -> pa.Table:
    """Placed documents -> token ids (control strings such as "[eop]" in a document stay text)."""
    texts = [str(t) for t in batch["text"]]
    ids = tokenizer_of(tokenizer_bytes).encode_batch(texts)
    return pa.table({"source": batch["source"], "split": batch["split"], "bucket": batch["bucket"],
                     "order": batch["order"], "chars": batch["chars"],
                     "tokens": pa.array(ids, type=pa.list_(pa.int32())), "n_tokens": [len(t) for t in ids],
                     "control_strings": [GLMTokenizer.has_control_strings(t) for t in texts]})


META_SCHEMA = pa.schema(
    [("split", pa.string()), ("group", pa.int32()), ("local", pa.int64()), ("kind", pa.int8()),
     ("tokens", pa.int64()), ("targets", pa.int64()), ("samples", pa.int32()), ("span_count", pa.int32()),
     ("span_tokens", pa.int32()), ("text_tokens", pa.int64()), ("path", pa.string())])


def write_rows(rows: list[dict[str, list[int]]], kinds: list[int], path: str, fs, seq_len: int) -> None:
    """Rows of one group (in local order) as a Parquet file of fixed-length int32 columns."""
    import pyarrow.parquet as pq

    from stages import storage

    columns = {"local": pa.array(range(len(rows)), pa.int64()), "kind": pa.array(kinds, pa.int8())}
    for c in COLUMNS:
        flat = np.fromiter((v for r in rows for v in r[c]), dtype=np.int32, count=len(rows) * seq_len)
        columns[c] = pa.FixedSizeListArray.from_arrays(pa.array(flat), seq_len)
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, compression="zstd")
    storage.write_bytes(fs, path, buffer.getvalue())


def _meta(split, group, built, path) -> pa.Table:
    """Per-row bookkeeping (no token arrays): what the driver needs to order and count rows."""
    return pa.Table.from_pylist([{
        "split": split, "group": group, "local": local, "kind": kind,
        "tokens": sum(1 for s in row["segment_ids"] if s), "targets": sum(1 for t in row["labels"] if t != -100),
        "samples": max(row["segment_ids"]), "span_count": len(spans), "span_tokens": sum(spans),
        "text_tokens": text_tokens, "path": path,
    } for local, (row, kind, text_tokens, spans) in enumerate(built)], schema=META_SCHEMA)


def build_bucket(group: pa.Table, objective: dict, special: dict, seed: int, rows_dir: str, fs) -> pa.Table:
    """One (split, bucket): documents in content-hash order -> one stream -> rows, written to
    rows_dir; returns the rows' metadata."""
    from glm.schema import SpecialTokens

    cfg = ObjectiveConfig(**objective)
    builder = BlankInfillingBuilder(cfg, SpecialTokens(**special), seed)
    split, bucket = group["split"][0].as_py(), group["bucket"][0].as_py()
    order = np.argsort(group["order"].to_numpy(), kind="stable")
    tokens = group["tokens"]
    stream: list[int] = []
    for i in order.tolist():
        stream += tokens[i].as_py() + [special["eos"]]
    built = [(r.row, r.kind, r.text_tokens, r.spans) for r in builder.build_stream(stream, split, bucket)]
    path = f"{rows_dir}/{split}-b{bucket:05d}.parquet"
    write_rows([b[0] for b in built], [b[1] for b in built], path, fs, cfg.seq_len)
    return _meta(split, bucket, built, path)


def parse_mip_files(batch: dict, datasets: list[dict], seed: int) -> pa.Table:
    """MIP JSONL files -> (dataset, path, line, prompt, answer, reason), a template per row by its RNG.

    A row's RNG is keyed by the file's position in its dataset's sorted file list, never by the
    path itself: the same inputs give the same rows wherever they lie."""
    rows = []
    for data, path in zip(batch["bytes"], batch["path"]):
        d = next(i for i, ds in enumerate(datasets) if path in ds["files"])
        file_number = datasets[d]["files"].index(path)
        templates = load_templates(datasets[d]["templates"])
        lines = bytes(data).split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                prompt, answer, reason = "", "", "empty"
            else:
                prompt, answer, reason = prompted_pair(line, datasets[d]["adapter"], templates,
                                                       sample_rng(seed, "mip-template", d, file_number, n))
            rows.append({"dataset": d, "path": path, "line": n, "prompt": prompt, "answer": answer, "reason": reason})
    return pa.Table.from_pylist(rows, schema=MIP_SCHEMA)


MIP_SCHEMA = pa.schema([("dataset", pa.int32()), ("path", pa.string()), ("line", pa.int64()),
                        ("prompt", pa.string()), ("answer", pa.string()), ("reason", pa.string())])


def build_mip(group: pa.Table, objective: dict, caps: list[int], tokenizer_bytes: bytes, rows_dir: str, fs) -> pa.Table:
    """One MIP dataset: its first `cap` usable rows (reason "") in file order -> prompted samples ->
    packed rows, written to rows_dir; returns the rows' metadata."""
    cfg = ObjectiveConfig(**objective)
    tok = tokenizer_of(tokenizer_bytes)
    group = group.filter(pc.equal(group["reason"], ""))
    d = group["dataset"][0].as_py()
    order = sorted(range(group.num_rows), key=lambda i: (group["path"][i].as_py(), group["line"][i].as_py()))
    usable = order[:caps[d]]
    prompts = tok.encode_batch([group["prompt"][i].as_py() for i in usable])
    answers = tok.encode_batch([group["answer"][i].as_py() for i in usable])
    samples = []
    for p, a in zip(prompts, answers):
        try:
            samples.append(layout_prompted(p, a, tok.special, use_2d=cfg.use_2d, max_len=cfg.mask_window))
        except ValueError:  # the answer alone does not fit a window: skipped (counted), never cut
            pass
    rows = pack_prompted(samples, cfg.seq_len, cfg.mask_window, tok.special.pad)
    path = f"{rows_dir}/mip-d{d:05d}.parquet"
    write_rows(rows, [KIND_MIP] * len(rows), path, fs, cfg.seq_len)
    return _meta("mip", d, [(row, KIND_MIP, 0, []) for row in rows], path)


SHARD_COLUMNS = ["split", "file", "rows", "first_index", "last_index", "sha256"]


def finalize_rows(item: dict, fs, staging: str, rows_per_shard: int) -> list[dict]:
    """Stamp the global index on one group's rows (-1 = not used), split off the unused ones and
    write the final shards of at most rows_per_shard rows; returns one record per shard."""
    import hashlib

    import pyarrow.parquet as pq

    from stages import storage

    table = pq.read_table(io.BytesIO(storage.read_bytes(fs, item["path"])))
    index = pa.array(np.asarray(item["positions"], dtype=np.int64))
    table = table.drop_columns(["local"]).add_column(0, "index", index)
    table = table.filter(pc.greater_equal(table["index"], 0))
    out = []
    for part, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        chunk = table.slice(start, rows_per_shard)
        buffer = io.BytesIO()
        pq.write_table(chunk, buffer, compression="zstd")
        name = f"{item['split']}/{item['stem']}-{part:03d}.parquet"
        storage.write_bytes(fs, f"{staging}/{name}", buffer.getvalue())
        out.append({"split": item["split"], "file": name, "rows": chunk.num_rows,
                    "first_index": pc.min(chunk["index"]).as_py(),
                    "last_index": pc.max(chunk["index"]).as_py(),
                    "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()})
    return out
