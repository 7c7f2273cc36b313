"""A Serve replica's tensor-parallel model: N Ray actors, one process per device, in the
replica's placement group, with a torch.distributed group among them (gloo on CPU, NCCL with
one GPU each).

Split of the work (docs/serve.md, "Tensor parallelism"): the replica keeps the
continuous-batching `DecodeEngine` (scheduling, sampling, text) and hands it a
`TensorParallelModel` in place of a `GLMModel`. Every forward pass the engine makes (prefill,
decode step, beam step) becomes one call on every worker, sent to all at once; the workers run
their shard of the model in lockstep (the collectives pair them up) and rank 0 returns the
last position's logits (all vocabulary, gathered from the ranks). The KV caches stay on the
workers (each rank holds its heads'): the engine sees `RemoteKVCache` handles, and the cache
edits it makes between forward passes (rows dropped, batches merged, beams reordered:
`glm.model.select_cache` / `concat_caches`) are queued and travel with the next forward call,
so a decode step costs one round trip to the workers, not one per edit.

A worker that fails alone (the others do not fail alike within ERROR_GRACE_S), dies, or does
not answer within `step_timeout_s` leaves the group out of step: the model is marked broken,
every later call fails, and the replica's health check fails, so Serve replaces the replica
(its workers die with it). An error every rank raises alike (a bad input) fails that call only.

Inputs and logits travel as numpy arrays: Ray pickles torch tensors through torch.save, which
cost several milliseconds per call (docs/benchmarks.md).
"""

from __future__ import annotations

import collections
import itertools
from pathlib import Path
from typing import Any

import numpy
import torch

from glm.config import GLMConfig
from glm.model import GLMOutput

STEP_TIMEOUT_S = 600.0
"""Longest wait for one forward pass of the workers before the group counts as broken."""
POLL_S = 1.0
"""How often a wait for the workers checks whether one of them failed."""
ERROR_GRACE_S = 10.0
"""After one worker failed, how long the others may take to fail alike before the group counts
as broken (a rank that failed alone leaves the others waiting in a collective)."""


class TPWorker:
    """One rank (a Ray actor; the class is plain so it can be read and tested without Ray): its
    shard of the model and the KV caches the replica refers to by id."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        self.model = None
        self.caches: dict[int, Any] = {}
        self.busy_s = 0.0
        """Seconds spent in `step` (cache edits and forward passes, collectives included)."""

    def address(self) -> str:
        """host:port for the process group's rendezvous (asked of rank 0)."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def setup(self, address: str, directory: str, device: str, dtype: str | None) -> None:
        """Join the process group and load this rank's shard of the checkpoint in `directory`
        (local to this node, verified by the replica)."""
        import datetime

        import torch.distributed as dist

        from glm.checkpoint import load_checkpoint_shard
        from glm.parallel import TPGroup

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"tensor-parallel rank {self.rank}: device 'cuda' asked for but this worker has no "
                               f"GPU (set serve.num_gpus: 1, one GPU per worker)")
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://{address}",
                                rank=self.rank, world_size=self.size,
                                timeout=datetime.timedelta(seconds=STEP_TIMEOUT_S))
        self.device = torch.device(device)
        self.model = load_checkpoint_shard(directory, TPGroup(), self.device,
                                           getattr(torch, dtype) if dtype else None)

    def held_bytes(self) -> int:
        """Bytes of this rank's weights."""
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    def busy_seconds(self) -> float:
        return self.busy_s

    def cache_ids(self) -> list[int]:
        """The KV caches this rank holds."""
        return sorted(self.caches)

    @torch.no_grad()
    def step(self, ops: list[tuple], forward: dict[str, Any] | None) -> torch.Tensor | None:
        """Apply the queued cache edits, then run one forward pass (when given; its tensors as
        numpy arrays); rank 0 returns the last position's logits (B, 1, vocab) as an fp32 numpy
        array, the others None."""
        import time

        from glm.model import concat_caches, select_cache

        started = time.perf_counter()
        for kind, sources, target, *args in ops:
            if kind == "free":
                self.caches.pop(sources[0], None)
            elif kind == "select":
                index, first = args
                self.caches[target] = select_cache(self.caches[sources[0]], torch.tensor(index, device=self.device),
                                                   first)
            elif kind == "concat":
                self.caches[target] = concat_caches(self.caches[sources[0]], self.caches[sources[1]], *args)
            else:
                raise ValueError(f"unknown cache operation {kind!r}")
        if forward is None:
            self.busy_s += time.perf_counter() - started
            return None
        past, target = forward.pop("past"), forward.pop("target")
        inputs = {k: None if v is None else torch.from_numpy(numpy.array(v)).to(self.device)
                  for k, v in forward.items()}
        out = self.model(**inputs, past_key_values=self.caches[past] if past is not None else None,
                         use_cache=target is not None)
        if target is not None:
            self.caches[target] = out.past_key_values
        logits = out.logits[:, -1:].float().cpu().numpy() if self.rank == 0 else None
        self.busy_s += time.perf_counter() - started
        return logits

class RemoteKVCache:
    """A KV cache held by the workers (each rank its heads' part), known here by id. Edits
    return new handles at once and are carried out with the next forward call; a handle
    dropped here frees the workers' copy then too."""

    def __init__(self, model: "TensorParallelModel", cache_id: int):
        self.model, self.id = model, cache_id

    def select(self, index: torch.Tensor, first: int = 0) -> "RemoteKVCache":
        return self.model._queue("select", (self.id,), index.tolist(), first)

    def concat(self, other: "RemoteKVCache", length: int) -> "RemoteKVCache":
        return self.model._queue("concat", (self.id, other.id), length)

    def __del__(self):
        self.model._freed.append(self.id)  # deque.append: safe from whichever thread drops the handle


class TensorParallelModel:
    """Called like `GLMModel` by `DecodeEngine` and `glm.generation.beam_search_steps` (inference
    with a KV cache only); the forward passes run on the workers. Inputs and logits live on the
    replica's CPU; `logits` are those of the last position only, (B, 1, vocab): all decoding uses."""

    device = torch.device("cpu")

    def __init__(self, config: GLMConfig, workers: list, step_timeout_s: float = STEP_TIMEOUT_S):
        self.config, self.workers, self.step_timeout_s = config, workers, step_timeout_s
        self.broken: str | None = None
        """Why the workers are out of step (None while they are fine)."""
        self._ops: list[tuple] = []
        self._freed: collections.deque[int] = collections.deque()
        self._ids = itertools.count()
        self.stats = collections.Counter()  # calls, seconds (round trips to the workers)

    def __call__(self, input_ids, position_ids, block_position_ids=None, segment_ids=None, prefix_mask=None,
                 labels=None, past_key_values: RemoteKVCache | None = None, use_cache: bool = False) -> GLMOutput:
        if labels is not None:
            raise NotImplementedError("a tensor-parallel serving model computes no loss")
        target = next(self._ids) if use_cache else None
        tensors = {"input_ids": input_ids, "position_ids": position_ids, "block_position_ids": block_position_ids,
                   "segment_ids": segment_ids, "prefix_mask": prefix_mask}
        forward = {name: None if t is None else t.cpu().numpy() for name, t in tensors.items()}
        forward.update(past=past_key_values.id if past_key_values is not None else None, target=target)
        logits = torch.from_numpy(numpy.array(self._run(forward)))
        return GLMOutput(logits=logits, past_key_values=RemoteKVCache(self, target) if use_cache else None)

    def _queue(self, kind: str, sources: tuple[int, ...], *args) -> RemoteKVCache:
        """A cache edit ('select' or 'concat' of the caches `sources`), carried out with the next call."""
        target = next(self._ids)
        self._ops.append((kind, sources, target, *args))
        return RemoteKVCache(self, target)

    def _run(self, forward: dict[str, Any] | None) -> torch.Tensor | None:
        """Send the queued edits and one forward pass to every worker; wait for all of them."""
        import time

        import ray
        from ray.exceptions import RayTaskError

        if self.broken:
            raise RuntimeError(f"the tensor-parallel workers are out of step: {self.broken}")
        ops, self._ops = self._ops, []
        while self._freed:
            ops.append(("free", (self._freed.popleft(),), None))
        t = time.perf_counter()
        refs = [worker.step.remote(ops, forward) for worker in self.workers]
        outcomes, pending, deadline = {}, refs, time.monotonic() + self.step_timeout_s
        errors: list[RayTaskError] = []
        while pending and time.monotonic() < deadline:
            # usually one wait returns them all; the poll notices a rank that failed alone
            wait = min(deadline - time.monotonic(), ERROR_GRACE_S if errors else POLL_S)
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, wait))
            if errors and pending:
                break  # the others are stuck in a collective the failed rank never joined
            for ref in ready:
                try:
                    outcomes[ref] = ray.get(ref)
                except RayTaskError as e:
                    errors.append(e)
                except Exception as e:  # noqa: BLE001 - a worker died
                    self.broken = f"a worker failed: {type(e).__name__}: {e}"
                    raise RuntimeError(f"the tensor-parallel workers are out of step: {self.broken}") from e
        if pending or (errors and len(errors) < len(refs)):
            self.broken = (f"{len(errors)} of {len(refs)} workers failed ({errors[0]}) and {len(pending)} did not "
                           f"finish" if errors else
                           f"{len(pending)} of {len(refs)} workers did not answer within {self.step_timeout_s:.0f}s")
            raise RuntimeError(f"the tensor-parallel workers are out of step: {self.broken}")
        self.stats["calls"] += 1
        self.stats["seconds"] += time.perf_counter() - t
        if errors:  # every rank raised alike (a bad input): still in step
            raise errors[0].as_instanceof_cause()
        return outcomes[refs[0]]

    def flush(self) -> None:
        """Send queued cache edits and frees now (they otherwise travel with the next forward call)."""
        self._run(None)

    def check(self) -> None:
        """RuntimeError when the workers are out of step (the replica's health check)."""
        if self.broken:
            raise RuntimeError(f"the tensor-parallel workers are out of step: {self.broken}")

    def close(self) -> None:
        """Stop the workers."""
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


def check_shardable(model_config: GLMConfig, spec, size: int, where: str) -> None:
    """ValueError when the checkpoint at `where` (its model config and quantization spec)
    cannot be served by `size` tensor-parallel workers."""
    from glm.parallel import check_divisible

    try:
        check_divisible(model_config, size, spec)
    except ValueError as e:
        raise ValueError(f"serve.tensor_parallel: {where}: {e}") from None


def start_tensor_parallel(directory: str | Path, config: GLMConfig, size: int, device: str = "auto",
                          dtype: str | None = None, num_gpus: float = 0.0) -> TensorParallelModel:
    """Start `size` workers in the caller's placement group (bundles 1..size; bundle 0 is the
    replica's own) or, outside one, wherever Ray places them, and load the checkpoint in the
    local, verified `directory` on them. They must share the node with `directory`: the
    replica's placement group is STRICT_PACK."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.get_current_placement_group()
    actor = ray.remote(TPWorker)
    workers = []
    for rank in range(size):
        options: dict[str, Any] = {"num_cpus": 1, "num_gpus": num_gpus}
        if group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=rank + 1)
        workers.append(actor.options(**options).remote(rank, size))
    try:
        address = ray.get(workers[0].address.remote())
        ray.get([w.setup.remote(address, str(directory), device, dtype) for w in workers], timeout=STEP_TIMEOUT_S)
    except BaseException:
        for worker in workers:
            ray.kill(worker)
        raise
    return TensorParallelModel(config, workers)
