"""Work on the blocks of a materialized Ray Data dataset with plain Ray tasks.

Each Ray Data execution (`to_pandas`, `groupby().map_groups()`, `from_items().flat_map()`)
starts an executor, builds its operators and, for a group-by, samples, sorts and merges
before the first row is touched: a fixed cost of seconds on a small, busy machine. What the
data stage needs after its two Ray Data executions is simpler: a few metadata columns on the
driver, groups whose keys it already knows, and one call per item. One task per block (and
one per bin of groups, or per item) does that without an executor; for a near-empty corpus the same calls
run in the driver (`local`), sparing the start of worker processes. Nothing here depends on
how rows are split into blocks: groups are whole when their function sees them, in key order.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

_REMOTE: dict = {}


def _remote(fn: Callable):
    """`ray.remote(fn)`, made once per process (Ray re-exports it to a new cluster by itself)."""
    import ray

    if fn not in _REMOTE:
        _REMOTE[fn] = ray.remote(fn)
    return _REMOTE[fn]


def _select(block: pa.Table, names: list[str], where) -> pa.Table | None:
    if block.num_rows == 0:  # an empty block may carry another step's schema
        return None
    return (block.filter(where) if where is not None else block).select(names)


def columns(ds, names: list[str], where=None, empty: pa.Schema | None = None) -> pa.Table:
    """Columns `names` of a materialized dataset's rows (those matching the pyarrow expression
    `where`, if given) as one table on the driver, in block order. `empty`: the schema of the
    result when the dataset has no blocks."""
    import ray

    tables = [t for t in ray.get([_remote(_select).remote(ref, names, where) for ref in ds.to_arrow_refs()])
              if t is not None]
    if not tables:
        return (empty or pa.schema([(n, pa.null()) for n in names])).empty_table().select(names)
    return pa.concat_tables(tables, promote_options="default")


MAX_GROUP_TASKS = 64
"""Group tasks of one `map_groups` at most (each takes a run of consecutive keys): bounds the
shuffle's objects at blocks x 64, whatever the number of groups."""


def _cut(block: pa.Table, key_columns: list[str], slot: dict, slots: int) -> list[pa.Table]:
    """A block's rows per slot (slot: key -> slot index; rows of other keys dropped)."""
    if block.num_rows == 0:  # an empty block may carry another step's schema
        return [block] * slots
    index = np.fromiter((slot.get(k, -1) for k in zip(*(block[c].to_pylist() for c in key_columns))),
                        dtype=np.int64, count=block.num_rows)
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(slots + 1))
    return [block.take(pa.array(order[bounds[i]:bounds[i + 1]])) for i in range(slots)]


def _split(block: pa.Table, key_columns: list[str], bins: list[list[tuple]]):
    """A block's rows per bin of keys, one table per bin (a single table for a single bin)."""
    parts = _cut(block, key_columns, {k: b for b, keys in enumerate(bins) for k in keys}, len(bins))
    return tuple(parts) if len(bins) > 1 else parts[0]


def _apply(fn: Callable, kwargs: dict, key_columns: list[str], keys: list[tuple], *parts: pa.Table) -> list:
    """`fn` of each key's rows among the parts of one bin, in key order."""
    rows = pa.concat_tables([p for p in parts if p.num_rows])
    groups = _cut(rows, key_columns, {k: i for i, k in enumerate(keys)}, len(keys))
    return [fn(group, **kwargs) for group in groups]


def map_groups(ds, key_columns: list[str], keys: list[tuple], fn: Callable, kwargs: dict, local: bool = False) -> list:
    """`fn(group, **kwargs)` for the rows of each key in `keys` (values of `key_columns`), each
    group's rows in one table; returns the results in key order.

    A hash shuffle in two rounds of tasks: each block is cut into one table per bin of
    consecutive keys (at most MAX_GROUP_TASKS bins), each bin's task joins its parts and calls
    `fn` per key. Rows keep their block order inside a group, which depends on partitioning:
    `fn` must sort them by a content key. local: the same calls in this process (for data too
    small to be worth starting tasks)."""
    import ray

    keys = [tuple(k) for k in keys]
    if not keys:
        return []
    if local:
        return _apply(fn, kwargs, key_columns, keys, *ray.get(ds.to_arrow_refs()))
    bins = [[keys[i] for i in chunk] for chunk in np.array_split(np.arange(len(keys)), min(len(keys), MAX_GROUP_TASKS))]
    split = _remote(_split).options(num_returns=len(bins))
    parts = [split.remote(ref, key_columns, bins) for ref in ds.to_arrow_refs()]
    if len(bins) == 1:
        parts = [[p] for p in parts]
    apply = _remote(_apply)
    results = ray.get([apply.remote(fn, kwargs, key_columns, b, *[p[i] for p in parts]) for i, b in enumerate(bins)])
    return [r for bin_results in results for r in bin_results]


def _call(fn: Callable, item, kwargs: dict):
    return fn(item, **kwargs)


def map_items(fn: Callable, items: list, kwargs: dict, local: bool = False) -> list:
    """`fn(item, **kwargs)` for each item, one task each (local: in this process); the results
    in item order."""
    import ray

    if local:
        return [fn(item, **kwargs) for item in items]
    return ray.get([_remote(_call).remote(fn, item, kwargs) for item in items])
