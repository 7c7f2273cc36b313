"""Per-row verdicts: every input row is kept or rejected with its reason; cleaning."""

import json

from stages.data.config import CleanConfig
from stages.data.documents import clean_text, parse_file

CFG = CleanConfig(min_chars=5, max_chars=1000)


def test_every_bad_row_gets_its_reason_and_good_rows_survive():
    lines = [
        json.dumps({"text": "a good document"}).encode(),
        b'{"text": "truncated',
        b'{"text": "bad \xff\xfe bytes"}',
        json.dumps({"body": "no text field"}).encode(),
        b"",
        b"   ",
        json.dumps({"text": "tiny"}).encode(),
        json.dumps({"text": "x" * 5000}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "another good one\u0007 with a bell"}).encode(),
    ]
    rows = parse_file(b"\n".join(lines) + b"\n", "f.jsonl", 0, "jsonl", "text", CFG)
    assert [r["reason"] for r in rows] == [
        "", "bad_json", "invalid_utf8", "missing_field", "empty", "empty", "too_short", "too_long",
        "missing_field", "",
    ]
    assert [r["line"] for r in rows] == list(range(1, 11))
    assert rows[9]["text"] == "another good one with a bell"
    assert rows[0]["doc_hash"] != rows[9]["doc_hash"] and rows[1]["doc_hash"] == 0


def test_plain_text_and_parquet(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = parse_file("first line here\n\nsecond line here\n".encode(), "f.txt", 1, "text", "text", CFG)
    assert [r["reason"] for r in rows] == ["", "empty", ""]
    buf = io.BytesIO()
    pq.write_table(pa.table({"content": ["parquet document", None]}), buf)
    rows = parse_file(buf.getvalue(), "f.parquet", 0, "parquet", "content", CFG)
    assert [r["reason"] for r in rows] == ["", "missing_field"]


def test_clean_text_normalises():
    assert clean_text("Ｆｕｌｌ\r\nwidth\x00 ", CleanConfig(normalization="NFKC")) == "Full\nwidth"
    assert clean_text("e\u0301", CleanConfig()) == "\u00e9"  # NFC composes
