"""Prepare SFT rows: read JSONL sources, format to chat samples (`glm.chat_format`), pack, write Parquet shards.

The output has the data stage's layout (manifest.json with splits and shards, train/ and
validation/ Parquet of the sample schema, tokenizer.model), so the training engine reads it
unchanged. Rows that fit no shape are counted per source and reason in the manifest, never
fatal. SFT sets are small next to pretraining corpora (1e4 - 1e6 conversations), so this runs
in the driver process rather than as a Ray Data job.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import posixpath
import random
import time
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from glm.chat_format import CHATGLM_6B, chat_format
from glm.schema import COLUMNS
from glm.tokenizer import GLMTokenizer
from stages import storage
from stages.sft.config import SFTDataConfig
from stages.sft.formatting import BadRow, conversation_samples, pack_rows, parse_row, shorten_replies

MANIFEST = "manifest.json"
ROWS_PER_SHARD = 4096


def completed(uri: str, fingerprint: str) -> dict | None:
    """The manifest of a complete prepared output for this fingerprint, if one exists."""
    fs, root = storage.resolve(uri)
    path = posixpath.join(root, MANIFEST)
    if not storage.exists(fs, path):
        return None
    manifest = json.loads(storage.read_bytes(fs, path))
    return manifest if manifest.get("config_hash") == fingerprint else None


def read_jsonl_rows(fs, paths: list[str], parse, stats: dict, limit: int = 0):
    """Parse each non-empty line of JSONL files with `parse(obj)`. Lines it rejects (BadRow, or
    invalid JSON as `bad_json`) are counted in stats["rejected"] by reason, the file and line of
    the first five kept in stats["examples"]; yields (line, parsed) for the others, at most
    `limit` (0 = all). stats["rows_read"] counts the lines read."""
    kept = 0
    for path in paths:
        for line_no, line in enumerate(storage.read_bytes(fs, path).decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            if limit and kept >= limit:
                return
            stats["rows_read"] += 1
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRow("bad_json", str(e)) from None
                item = parse(obj)
            except BadRow as e:
                stats["rejected"][e.reason] += 1
                if len(stats["examples"]) < 5:
                    stats["examples"].append(f"{path}:{line_no}: {e}")
                continue
            kept += 1
            yield line, item


def _conversation_samples(row, shape: str, reply_max_tokens: int, **kwargs) -> tuple:
    conv = parse_row(row, shape)
    if reply_max_tokens:
        conv = shorten_replies(conv, reply_max_tokens, kwargs["tokenizer"])
    return conv, conversation_samples(conv, **kwargs)


HELDOUT_PROMPTS = 32
"""Held-out chat prompts kept in the manifest (`heldout_prompts`): what the SFT stage's export
answers to measure the chat behaviour it taught (language, ending the turn, no loops)."""


def heldout_prompt(conv) -> dict | None:
    """The last user query of a plain conversation (no system, no tools) and the rounds before it."""
    if conv.tools or any(m.role not in ("user", "assistant") or m.tool_calls for m in conv.messages):
        return None
    rounds = conv.rounds
    return {"query": rounds[-1][0], "history": [list(r) for r in rounds[:-1]]} if rounds else None


def split_of(conv_key: str, fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(conv_key.encode()).digest()[:8], "big")
    return "validation" if (h % 1_000_000) / 1_000_000 < fraction else "train"


def prepare(cfg: SFTDataConfig, tokenizer: GLMTokenizer, *, use_2d: bool, fingerprint: str, log=print) -> dict:
    """Write the prepared rows to cfg.output (reusing a complete one) in the chat format
    cfg.chat_format (empty: ChatGLM-6B's); returns the manifest."""
    if (manifest := completed(cfg.output, fingerprint)) is not None:
        log(f"[sft] prepared data for {fingerprint} exists at {cfg.output}: reusing it")
        return manifest
    if not cfg.sources:
        raise ValueError("sft config: data.sources is empty: name at least one JSONL file of conversations")
    t0 = time.time()
    fmt = chat_format(cfg.chat_format or CHATGLM_6B, tokenizer)  # a tokenizer that cannot carry it fails here
    files = {s.name: storage.expand(s.uri) for s in cfg.sources}  # fails early on a missing input
    samples = {"train": [], "validation": []}
    sources, heldout = {}, []
    for source in cfg.sources:
        fs, paths = files[source.name]
        stats = {"rows_read": 0, "conversations": 0, "samples": 0, "rejected": Counter(), "examples": []}
        to_samples = functools.partial(_conversation_samples, shape=source.format,
                                       reply_max_tokens=cfg.reply_max_tokens, tokenizer=tokenizer,
                                       seq_len=cfg.seq_len, use_2d=use_2d, last_turn_only=cfg.train_on == "last_turn",
                                       fmt=fmt)
        for line, (conv, made) in read_jsonl_rows(fs, paths, to_samples, stats, limit=cfg.max_samples):
            stats["conversations"] += 1
            stats["samples"] += len(made)
            split = split_of(line, cfg.validation_fraction)
            samples[split] += made
            if split == "validation" and (prompt := heldout_prompt(conv)) is not None and prompt not in heldout:
                heldout.append(prompt)  # threads that share a first turn ask it once
        rejected = sum(stats["rejected"].values())
        log(f"[sft] {source.name}: {stats['rows_read']:,} rows, {stats['conversations']:,} conversations kept, "
            f"{stats['samples']:,} samples, {rejected:,} rejected {dict(stats['rejected']) or ''}")
        for example in stats["examples"]:
            log(f"[sft]   rejected {example}")
        stats["rejected"] = dict(stats["rejected"])
        sources[source.name] = stats
    if not samples["train"]:
        raise ValueError(f"sft data: no usable training samples in {[s.uri for s in cfg.sources]} "
                         f"(rejected: {[s['rejected'] for s in sources.values()]})")
    if not samples["validation"] and len(samples["train"]) > 1:
        samples["validation"].append(samples["train"].pop())  # a held-out loss needs at least one

    splits = {}
    for split, items in samples.items():
        random.Random(f"{cfg.seed}-{split}").shuffle(items)
        splits[split] = (pack_rows(items, cfg.seq_len, tokenizer.special.pad, pack=cfg.pack), len(items))
    manifest = write_prepared(cfg.output, splits, tokenizer, {
        "config_hash": fingerprint, "kind": "sft", "chat_format": fmt.name,
        "schema": {"columns": list(COLUMNS), "seq_len": cfg.seq_len,
                   "position_encoding": "rope_2d" if use_2d else "rope_1d", "extra": ["index"]},
        "sources": sources,
        "heldout_prompts": random.Random(f"{cfg.seed}-prompts").sample(heldout, min(len(heldout), HELDOUT_PROMPTS))})
    splits = manifest["splits"]
    log(f"[sft] prepared {splits['train']['rows']:,} train rows ({splits['train']['samples']:,} samples) and "
        f"{splits['validation']['rows']:,} validation rows in {time.time() - t0:.1f}s -> {cfg.output}")
    return manifest


def write_prepared(output: str, splits: dict[str, tuple[list[dict], int]], tokenizer: GLMTokenizer,
                   manifest: dict) -> dict:
    """Write rows of the sample schema in the data stage's layout (Parquet shards per split,
    tokenizer.model, manifest.json), staged and moved into place last; returns the manifest
    with its `tokenizer` and `splits` entries filled in. `splits`: name -> (rows, samples)."""
    out_fs, out_root = storage.resolve(output)
    staging = f"{out_root}.tmp-{uuid.uuid4().hex[:8]}"
    out_fs.create_dir(staging, recursive=True)
    try:
        manifest = {**manifest,
                    "tokenizer": {"sha256": hashlib.sha256(tokenizer.to_bytes()).hexdigest(), "pieces": len(tokenizer)},
                    "splits": {split: _write_split(out_fs, staging, split, rows, n) for split, (rows, n) in splits.items()}}
        storage.write_bytes(out_fs, posixpath.join(staging, GLMTokenizer.MODEL_FILE), tokenizer.to_bytes())
        storage.write_bytes(out_fs, posixpath.join(staging, MANIFEST),
                            json.dumps(manifest, indent=2, ensure_ascii=False).encode())
        storage.replace_dir(out_fs, staging, out_root)
    finally:
        if storage.exists(out_fs, staging):
            out_fs.delete_dir(staging)
    return manifest


def _write_split(fs, staging: str, split: str, rows: list[dict[str, list[int]]], n_samples: int) -> dict:
    shards = []
    for start in range(0, len(rows), ROWS_PER_SHARD):
        chunk = rows[start:start + ROWS_PER_SHARD]
        table = pa.table({"index": pa.array(range(start, start + len(chunk)), pa.int64()),
                          **{c: pa.array([r[c] for r in chunk], pa.list_(pa.int32())) for c in COLUMNS}})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        name = f"{split}/s{start // ROWS_PER_SHARD:05d}.parquet"
        storage.write_bytes(fs, posixpath.join(staging, name), data)
        shards.append({"file": name, "rows": len(chunk), "first_index": start,
                       "last_index": start + len(chunk) - 1, "sha256": hashlib.sha256(data).hexdigest()})
    labels = np.array([r["labels"] for r in rows]) if rows else np.zeros((0, 0))
    return {"rows": len(rows), "samples": n_samples, "shards": shards,
            "tokens": int(sum(np.count_nonzero(r["segment_ids"]) for r in rows)),
            "target_tokens": int((labels != -100).sum())}
