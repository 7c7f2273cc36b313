"""Turning corpus files into clean documents, one verdict per input row (no Ray here).

Every input row becomes exactly one output row: either a cleaned document (reason "") or a
rejection with its reason, so counts add up and nothing is silently dropped.
"""

from __future__ import annotations

import hashlib
import io
import json
import unicodedata
from pathlib import PurePosixPath
from typing import Iterator

from stages.data.config import CleanConfig

REASONS = ("bad_json", "invalid_utf8", "missing_field", "empty", "too_short", "too_long", "quality", "language",
           "contaminated", "near_duplicate", "duplicate")

# Control characters except newline and tab (category Cc), plus other invisible format
# characters that break tokenization (zero-width no-break space / BOM).
_CONTROL = {c: None for c in range(0x20) if c not in (0x09, 0x0A)}
_CONTROL.update({0x7F: None, 0xFEFF: None})
_CONTROL.update({c: None for c in range(0x80, 0xA0)})


def file_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = PurePosixPath(path).suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def clean_text(text: str, cfg: CleanConfig) -> str:
    """Normalise Unicode, drop control characters, turn CRLF into LF, strip the ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.normalization != "none":
        text = unicodedata.normalize(cfg.normalization, text)
    return text.translate(_CONTROL).strip()


def doc_hash(text: str) -> int:
    """63-bit content hash (exact de-duplication, splits, buckets, ordering)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def verdict(text: str | None, reason: str, cfg: CleanConfig) -> tuple[str, str]:
    """(cleaned text, reason) for a raw document; reason "" = keep."""
    if reason:
        return "", reason
    if not isinstance(text, str):
        return "", "missing_field"
    cleaned = clean_text(text, cfg)
    if not cleaned:
        return "", "empty"
    if len(cleaned) < cfg.min_chars:
        return "", "too_short"
    if len(cleaned) > cfg.max_chars:
        return "", "too_long"
    return cleaned, ""


def _raw_rows(data: bytes, fmt: str, text_field: str) -> Iterator[tuple[int, str | None, str]]:
    """(line number, raw text or None, reason) for every row of a file."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        if text_field not in table.column_names:
            for i in range(table.num_rows):
                yield i + 1, None, "missing_field"
            return
        for i, value in enumerate(table.column(text_field).to_pylist()):
            yield i + 1, value, "" if isinstance(value, str) else "missing_field"
        return
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the file's final newline
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield n, None, "invalid_utf8"
            continue
        if fmt == "text":
            yield n, line, ""
            continue
        if not line.strip():
            yield n, None, "empty"
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            yield n, None, "bad_json"
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            yield n, None, "missing_field"
            continue
        yield n, obj[text_field], ""


def parse_file(data: bytes, path: str, source: int, fmt: str, text_field: str, cfg: CleanConfig) -> list[dict]:
    """All rows of one file as dicts: source, path, line, text, reason, doc_hash."""
    rows = []
    for line, raw, reason in _raw_rows(data, fmt, text_field):
        text, reason = verdict(raw, reason, cfg)
        rows.append({"source": source, "path": path, "line": line, "text": text, "reason": reason,
                     "doc_hash": doc_hash(text) if not reason else 0})
    return rows
