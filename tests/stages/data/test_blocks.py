"""The group-by of `stages.data.blocks` without Ray: a block cut per key, the parts joined."""

import pyarrow as pa

from stages.data.blocks import _apply, _split


def test_split_cuts_a_block_per_key_and_drops_rows_of_other_keys():
    block = pa.table({"split": ["train", "validation", "train", "train", "test"], "bucket": [1, 0, 0, 1, 0],
                      "v": [10, 11, 12, 13, 14]})
    keys = [("train", 0), ("train", 1), ("validation", 0)]
    parts = _split(block, ["split", "bucket"], keys)
    assert [p["v"].to_pylist() for p in parts] == [[12], [10, 13], [11]]
    assert _split(block, ["split", "bucket"], [("train", 1)])["v"].to_pylist() == [10, 13]  # one key: one table
    empty = pa.table({"other": pa.array([], pa.int64())})  # an empty block of another schema
    assert all(p.num_rows == 0 for p in _split(empty, ["split", "bucket"], keys))


def test_apply_joins_the_non_empty_parts():
    parts = [pa.table({"v": [1]}), pa.table({"other": pa.array([], pa.int64())}), pa.table({"v": [2, 3]})]
    assert _apply(lambda t, k: t["v"].to_pylist() + [k], {"k": 9}, *parts) == [1, 2, 3, 9]
