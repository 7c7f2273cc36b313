"""The group-by of `stages.data.blocks` without Ray: blocks cut per bin of keys, each bin's parts
joined and cut per key."""

import pyarrow as pa

from stages.data.blocks import _apply, _split


def test_split_cuts_a_block_per_bin_of_keys_and_drops_rows_of_other_keys():
    block = pa.table({"split": ["train", "validation", "train", "train", "test"], "bucket": [1, 0, 0, 1, 0],
                      "v": [10, 11, 12, 13, 14]})
    bins = [[("train", 0), ("train", 1)], [("validation", 0)]]
    parts = _split(block, ["split", "bucket"], bins)
    assert [p["v"].to_pylist() for p in parts] == [[10, 12, 13], [11]]
    assert _split(block, ["split", "bucket"], [[("train", 1)]])["v"].to_pylist() == [10, 13]  # one bin: one table
    empty = pa.table({"other": pa.array([], pa.int64())})  # an empty block of another schema
    assert all(p.num_rows == 0 for p in _split(empty, ["split", "bucket"], bins))


def test_apply_joins_a_bins_parts_and_calls_the_function_per_key_in_key_order():
    parts = [pa.table({"k": [2, 1], "v": [1, 2]}), pa.table({"other": pa.array([], pa.int64())}),
             pa.table({"k": [1, 2], "v": [3, 4]})]
    assert _apply(lambda t, tag: (tag, t["v"].to_pylist()), {"tag": "x"}, ["k"], [(1,), (2,)], *parts) == \
        [("x", [2, 3]), ("x", [1, 4])]
