"""The one training loop, run by every Ray Train worker (or a plain process: runtime.py).
Stages plug in a TrainSpec.

Exact resume: the batch of a step is a function of the consumed-sample count (engine-owned
data position), every rank's RNG states (torch CPU and CUDA, numpy, Python) are gathered into
the checkpoint, and DeepSpeed restores model, optimizer and LR schedule. A killed run
therefore replays the same losses. Checkpoints count only when complete (checkpoints.py);
one written by N workers resumes with M through DeepSpeed's universal checkpoint.

Tensor parallelism (cfg.tensor_parallel = T > 1, parallel.py): the workers form W / T model
replicas of T consecutive ranks; each rank trains its shard of the model (glm/parallel.py),
DeepSpeed gets the groups as its model-parallel unit (ZeRO and the gradient all-reduce over
the replicas only). Data, dropout seeds, losses and metrics are per replica: every rank of a
replica gets the same rows, and reductions run over the data-parallel group. A checkpoint
written at another degree (or worker count) resumes through the universal checkpoint, which
merges and re-slices the shards with the model's universal_checkpoint_info.

Gradient accumulation is the engine's: every micro-batch runs backward on every rank (the
last one marked as DeepSpeed's accumulation boundary), then one DeepSpeed step. A non-finite loss anywhere poisons the reduced gradient, so DeepSpeed
skips that update on every rank alike (replicas stay identical); the skip is counted, and a
run of max_consecutive_skips stops the run with an error instead of restarting forever.
"""

from __future__ import annotations

import math
import os
import posixpath
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from stages import storage
from stages.engine import steplog
from stages.engine.checkpoints import (UNIVERSAL, CheckpointStore, convert_to_universal, find_checkpoint, local_copy,
                                       tag_for)
from stages.engine.config import EngineConfig
from stages.engine.steplog import StepLog


@dataclass
class TrainSpec:
    """What a stage plugs into the engine (all module-level callables: they travel to workers)."""

    model_factory: Callable[[], Any]
    """Builds the torch module (same seed on every rank gives identical initial weights)."""
    data_uri: str
    """A data-stage output (train/ and validation/ shards of the sample schema)."""
    step_fn: Callable[[Any, dict], Any]
    """(model engine, batch of tensors) -> scalar loss, or a dict with "loss" and other scalar
    tensors (averaged over micro-batches and ranks and reported beside the loss; validation
    reports each as val_<name>) and JSON-like examples (lists, e.g. sample responses: rank 0's
    first validation batch is logged as an MLflow artifact validation/step<N>.json)."""
    iteration_fn: Callable[[Any, dict, "IterationContext"], dict] | None = None
    """For stages that drive their own optimisation within a step (PPO): called once per step
    with the rank's whole batch (micro_batch_size x grad_accum_steps rows); it may call
    engine.backward / engine.step several times and returns scalar metrics including "loss".
    Its `context.state` dict is checkpointed with the engine state. step_fn then only serves
    validation."""
    optimizer_steps_per_step: int = 1
    """engine.step() calls per engine step (iteration_fn stages), so the LR schedule spans the run
    (its warm-up too: optim.warmup_steps counts engine steps, like train_steps)."""
    clips_gradients: bool = False
    """The iteration_fn clips gradients itself (e.g. PPO: actor and critic separately) before
    engine.step(); the engine's global clip (optim.grad_clip) is then off."""
    export_fn: Callable[[Any], dict | None] | None = None
    """Called on rank 0 with the trained (full, unsharded) module at the end; a returned dict
    (name -> JSON-serialisable object) is logged to the MLflow run as artifacts."""
    tracking_uri: str = ""
    """MLflow tracking URI ("" = no tracking)."""
    experiment: str = "glm-pipeline"
    parent_run_id: str = ""
    """MLflow run to nest this training run under (a pipeline's parent run); "" = top level."""
    params: dict = field(default_factory=dict)
    """Logged as MLflow params of a new run."""
    flops_fn: Callable[[int], tuple[float, float]] | None = None
    """sequence length of the data -> (model FLOPs, hardware FLOPs with recomputation) per trained
    token, for MFU and HFU (e.g. glm.flops.training_flops_per_token bound to a config); None =
    not reported."""
    grad_norm_params: dict[str, str] = field(default_factory=dict)
    """Extra gradient norms to report: metric name -> parameter name (e.g. the embedding, for EGS)."""
    artifacts: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable objects logged to the MLflow run when it is created (name -> object)."""
    start_metrics: dict[str, float] = field(default_factory=dict)
    """Metrics logged at step 0 when the MLflow run is created (e.g. data counts)."""
    nonfinite_steps: list[int] = field(default_factory=list)
    """Testing: at these (0-based) steps one micro-batch of one rank (the last micro-batch of
    rank step % world) gets a NaN loss."""


@dataclass
class IterationContext:
    """What an iteration_fn knows about where it is (everything it needs to be deterministic)."""

    step: int
    """The engine step being run (0-based)."""
    rank: int
    world: int
    seed: int
    """EngineConfig.seed."""
    state: dict
    """Stage state that survives restarts (checkpointed in client_state): JSON-like values."""


def lm_loss_step(engine, batch: dict):
    """The GLM objective on rows of the sample schema: the model computes the loss."""
    return engine(**batch).loss


def build_optimizer(model, cfg: EngineConfig):
    """AdamW over the trainable parameters (frozen ones, e.g. a LoRA base, get no state);
    no weight decay on vectors (biases, norms). A model may carry `lr_scales` (parameter-name
    prefix -> LR multiplier, e.g. PPO's critic): those parameters get their own groups."""
    import torch

    scales: dict[str, float] = getattr(model, "lr_scales", {})

    def scale(name: str) -> float:
        return next((v for prefix, v in scales.items() if name.startswith(prefix)), 1.0)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    groups = []
    for s in dict.fromkeys(scale(n) for n, _ in trainable):  # first-seen order
        for matrices in (True, False):
            params = [p for n, p in trainable if scale(n) == s and (p.ndim >= 2) == matrices]
            if params:
                groups.append({"params": params, "lr": cfg.optim.lr * s,
                               "weight_decay": cfg.optim.weight_decay if matrices else 0.0})
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    if cfg.offload_optimizer and cfg.cpu_adam and cfg.zero_stage >= 2:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # compiled on first use

        return DeepSpeedCPUAdam(groups, lr=cfg.optim.lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=betas)


def lr_lambda(cfg: EngineConfig, steps_per_step: int = 1) -> Callable[[int], float]:
    """Warm-up then cosine over the run's optimizer steps: train_steps and warmup_steps count
    engine steps of steps_per_step optimizer steps each (iteration_fn stages)."""
    o = cfg.optim
    total, warmup = cfg.train_steps * steps_per_step, o.warmup_steps * steps_per_step

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: EngineConfig, load_universal: bool = False) -> dict:
    """DeepSpeed's config from the engine's. The engine owns gradient accumulation (it marks the
    last micro-batch of a step as DeepSpeed's accumulation boundary and scales the losses
    itself), so the number of micro-batches may change from step to step (batch warm-up,
    another worker count); DeepSpeed's own accumulation count is bookkeeping only."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer and cfg.zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu"}
        # DeepSpeed's CPU Adam (cpu_adam), or torch's AdamW stepping the offloaded state on the
        # CPU, which DeepSpeed accepts only with this flag off
        config["zero_force_ds_cpu_optimizer"] = cfg.cpu_adam
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def train_loop(config: dict) -> None:
    """Entry point of each Ray Train worker."""
    from stages.engine.runtime import RayRuntime

    run_training(config["spec"], config["engine"], RayRuntime())


def run_uri(cfg: EngineConfig) -> str:
    """<storage>/<run>: the engine's checkpoints and step log (path or URI)."""
    return posixpath.join(storage.absolute(cfg.storage_path).rstrip("/"), cfg.run_name)


def skip_shm_comm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (`deepspeed_shm_comm`)
    in every process that initializes its communication: a C++ build of one to several minutes on
    a fresh machine (under a lock file every DeepSpeed process of the machine waits on), 1-2 s per
    process after that. Only DeepSpeed's inference all-reduce uses it, never training, whose
    collectives go through torch.distributed (gloo): mark it unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def run_training(spec: TrainSpec, cfg: EngineConfig, rt) -> None:
    """The training loop of one worker (rank rt.rank of rt.world), under Ray Train or not."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from stages.engine.data import ShardSource

    from glm.model import GLMModel
    from stages.engine.parallel import (ModelParallelUnit, check_same_node, tensor_parallel_module,
                                        universal_checkpoint_info)

    if not torch.cuda.is_available():
        skip_shm_comm_build()
    rank, world, tp = rt.rank, rt.world, cfg.tensor_parallel
    # the data-parallel view: replicas of `tp` consecutive ranks (without TP, every rank is one)
    mpu = ModelParallelUnit(world, tp, rank) if tp > 1 else None
    dp, dp_rank, dp_group = (mpu.dp_size, mpu.dp_rank, mpu.dp_group) if mpu else (world, rank, None)
    if mpu:
        check_same_node(mpu)
    cfg.check_world(dp)
    use_cuda = torch.cuda.is_available() and cfg.use_gpu is not False
    device = torch.device("cuda", rt.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    store = CheckpointStore(run_uri(cfg))

    # where this attempt starts: this run's newest complete checkpoint, else resume_from's
    plan = [None, [], 0]
    if rank == 0:
        plan = [*_choose_checkpoint(store, cfg), steplog.attempts(run_uri(cfg))]
    dist.broadcast_object_list(plan, src=0)
    found, rejected, attempt = plan
    saved_tp = found.record.get("tensor_parallel", 1) if found is not None else tp
    elastic = found is not None and (found.record["world"] != world or saved_tp != tp)
    if elastic and rank == 0:
        print(f"[engine] {found.uri} was written by {found.record['world']} workers at tensor_parallel {saved_tp}, "
              f"resuming with {world} at tensor_parallel {tp}: converting it to DeepSpeed's universal checkpoint",
              flush=True)
        convert_to_universal(found)
    dist.barrier()

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = spec.model_factory()
    shapes = _param_shapes(model)  # the dense model's: the same at every tensor-parallel degree
    if found is not None:
        _check_same_model(found, shapes)
    if mpu:
        model = tensor_parallel_module(model, mpu)
    if isinstance(model, GLMModel):  # lets a checkpoint change tensor-parallel degree (read by DeepSpeed)
        model.universal_checkpoint_info = universal_checkpoint_info(model, model.config, tp)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, spec.optimizer_steps_per_step))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
        config={**deepspeed_config(cfg, elastic), **({"gradient_clipping": 0.0} if spec.clips_gradients else {})})
    _guard_plain_optimizer(engine)
    # dropout differs per replica; the ranks of a replica draw the same masks (their replicated
    # activations must stay identical)
    torch.manual_seed(cfg.seed * 1000 + dp_rank + 1)

    state = {"step": 0, "consumed": 0, "skipped_steps": 0, "consecutive_skips": 0, "mlflow_run_id": None,
             "stage": {}}
    log = StepLog(run_uri(cfg), attempt) if rank == 0 else None
    if found is not None:
        _load(engine, found, elastic, state, rank)
        if not found.uri.startswith(run_uri(cfg) + "/"):  # another run's checkpoint (resume_from)
            state["mlflow_run_id"] = None
    if log:
        log.write({"event": "start", "world": world, "tensor_parallel": tp,
                   "resumed_from": found.uri if found else None, "step": state["step"], "time": time.time()})
        for uri, why in rejected:
            print(f"[engine] checkpoint {uri} rejected: {why}", flush=True)
            log.write({"event": "checkpoint_rejected", "checkpoint": uri, "reason": why})

    source = ShardSource(spec.data_uri, "train", cfg.seed, cfg.skip_data_ranges)
    model_flops, hardware_flops = spec.flops_fn(source.seq_len) if spec.flops_fn else (0.0, 0.0)
    tracker = _Tracker(spec, cfg, state) if rank == 0 else None
    if cfg.validate_at_start and state["step"] == 0:
        val, examples = _validate(engine, spec, cfg, dp_rank, dp, device, dp_group)
        val = {f"val_{k}": v for k, v in val.items()}
        if rank == 0:
            print("[engine] validation before training: " + "  ".join(f"{k} {v:.4f}" for k, v in val.items()), flush=True)
            tracker.log(val, 0)
            _log_validation(tracker, examples, 0)
    grad_history: list[float] = []
    t_last, tokens_since = time.time(), 0
    stopped = ""
    while state["step"] < cfg.train_steps:
        step = state["step"]
        if not cfg.fail_in_checkpoint:
            _maybe_fail(cfg, step, rank, attempt)
        t_step = time.time()
        micro, n_micro = cfg.micro_batch_size, cfg.micro_batches_at(step, dp)
        indices, consumed = source.indices(state["consumed"], cfg.global_batch_at(step, dp))
        per_rank = micro * n_micro
        mine = indices[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        step_tokens = source.tokens(indices)  # the whole global batch, every rank's share
        tokens_since += step_tokens
        skipped_before = engine.skipped_steps
        losses, nonfinite, extra_norms, sums = [], 0, {}, {}
        if spec.iteration_fn is not None:
            batch = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in source.rows(mine).items()}
            context = IterationContext(step=step, rank=dp_rank, world=dp, seed=cfg.seed, state=state["stage"])
            out = spec.iteration_fn(engine, batch, context)
            losses.append(torch.as_tensor(float(out["loss"])))
            sums = {k: float(v) for k, v in out.items() if k != "loss"}
        else:
            for m in range(n_micro):
                rows = source.rows(mine[m * micro:(m + 1) * micro])
                batch = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in rows.items()}
                loss = spec.step_fn(engine, batch)
                if isinstance(loss, dict):
                    for k, v in loss.items():
                        if k != "loss" and not _is_example(v):
                            sums[k] = sums.get(k, 0.0) + float(v) / n_micro
                    loss = loss["loss"]
                if step in spec.nonfinite_steps and dp_rank == step % dp and m == n_micro - 1:
                    loss = loss * float("nan")  # testing: one micro-batch of one replica
                if torch.isfinite(loss):
                    losses.append(loss.detach().float())
                else:
                    # Every rank still runs every backward (DeepSpeed's collectives stay in step);
                    # a NaN loss makes the reduced gradient non-finite on every rank, and
                    # DeepSpeed then skips the whole update everywhere.
                    nonfinite += 1
                    loss = loss * float("nan")
                engine.set_gradient_accumulation_boundary(m == n_micro - 1)
                engine.backward(loss / n_micro, scale_wrt_gas=False)
            extra_norms = _param_grad_norms(engine, spec.grad_norm_params, mpu)  # reduced, before step() clears them
            engine.step()
        skipped = engine.skipped_steps - skipped_before  # the same on every rank
        bad = torch.tensor([float(nonfinite)], device=device)
        dist.all_reduce(bad, group=dp_group)
        if bad.item() > 0 and not skipped:
            raise RuntimeError(f"step {step + 1}: a non-finite loss did not skip the optimizer step "
                               f"(optimizer {type(engine.optimizer).__name__})")
        state["consumed"] = consumed
        state["step"] += 1
        state["skipped_steps"] += skipped
        state["consecutive_skips"] = state["consecutive_skips"] + 1 if skipped else 0
        mean_loss = torch.stack(losses).mean() if losses else torch.tensor(float("nan"))
        total = torch.tensor([mean_loss.item() if losses else 0.0, 1.0 if losses else 0.0], device=device)
        dist.all_reduce(total, group=dp_group)  # once per replica: its ranks compute the same loss
        metrics = {
            "step": state["step"], "loss": (total[0] / total[1]).item() if total[1] > 0 else float("nan"),
            "lr": scheduler.get_last_lr()[0], "consumed_samples": state["consumed"],
            "skipped_steps": state["skipped_steps"], "nonfinite_microbatches": int(bad.item()),
            "global_batch": len(indices), "micro_batches": n_micro,
        }
        metrics.update(extra_norms)
        stage_metrics = _mean_over_ranks(sums, dp, device, dp_group)  # collective: every rank
        metrics.update(stage_metrics)
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None and not skipped and math.isfinite(float(grad_norm)):
            grad_norm = float(grad_norm)
            metrics["grad_norm"] = grad_norm
            if len(grad_history) >= 10 and grad_norm > cfg.grad_spike_factor * float(np.mean(grad_history[-50:])):
                metrics["grad_spike"] = 1.0
                if rank == 0:
                    print(f"[engine] warning: gradient norm spike at step {step + 1}: {grad_norm:.3g}", flush=True)
            grad_history.append(grad_norm)
        if cfg.precision == "fp16":
            metrics["loss_scale"] = float(optimizer.cur_scale) if hasattr(optimizer, "cur_scale") else 0.0
        if rank == 0:
            if skipped:
                print(f"[engine] step {state['step']}: non-finite loss or gradient, optimizer step skipped on "
                      f"every rank ({state['consecutive_skips']} in a row)", flush=True)
            log.write({"step": state["step"], "loss": metrics["loss"], "skipped": skipped,
                       "seconds": time.time() - t_step, "time": time.time(), "tokens": step_tokens,
                       "metrics": stage_metrics, "indices": [int(i) for i in indices]})
        if cfg.max_consecutive_skips and state["consecutive_skips"] >= cfg.max_consecutive_skips:
            stopped = (f"{state['consecutive_skips']} consecutive optimizer steps skipped for non-finite losses "
                       f"or gradients (steps {state['step'] - state['consecutive_skips'] + 1}-{state['step']}; "
                       f"max_consecutive_skips {cfg.max_consecutive_skips}): lower the learning rate, check the "
                       f"data around sample {state['consumed']}, or skip it with skip_data_ranges")
            break
        done = state["step"] == cfg.train_steps
        if cfg.validate_every and (state["step"] % cfg.validate_every == 0 or done):
            val, examples = _validate(engine, spec, cfg, dp_rank, dp, device, dp_group)
            metrics.update({f"val_{k}": v for k, v in val.items()})
            if rank == 0:
                _log_validation(tracker, examples, state["step"])
        if state["step"] % cfg.log_every == 0 or done or state["step"] == 1:
            elapsed = time.time() - t_last
            metrics["tokens_per_s"] = tokens_since / max(elapsed, 1e-9)
            if model_flops and cfg.peak_flops_per_worker:
                peak = cfg.peak_flops_per_worker * world
                metrics["mfu"] = metrics["tokens_per_s"] * model_flops / peak
                metrics["hfu"] = metrics["tokens_per_s"] * hardware_flops / peak
            t_last, tokens_since = time.time(), 0
            if rank == 0:
                print("[engine] " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in metrics.items()), flush=True)
                tracker.log(metrics, state["step"])
                log.flush()
        if state["step"] % cfg.checkpoint_every == 0 or done:
            fail = cfg.fail_in_checkpoint and _fails_now(cfg, state["step"], rank, attempt)
            _save(engine, store, state, metrics, rt, cfg, fail, shapes)
            if rank == 0:
                log.flush()

    if stopped:
        if rank == 0:
            print(f"[engine] stopping: {stopped}", flush=True)
            log.write({"event": "stopped", "reason": stopped})
            log.flush()
            tracker.end("FAILED")
        return
    if cfg.check_replicas:
        same = _replicas_identical(engine, cfg, world, mpu.tp_rank if mpu else 0)
        if rank == 0:
            print(f"[engine] replicas identical: {same}", flush=True)
            log.write({"event": "replicas", "identical": same})
    if spec.export_fn is not None:
        artifacts = _export(engine, spec, cfg, rank, mpu)
        if tracker and artifacts:
            tracker.log_artifacts(artifacts)
    if tracker:
        log.flush()
        tracker.log_loss_curve(steplog.read(run_uri(cfg)), cfg.run_name)
        tracker.end()


def stopped_reason(cfg: EngineConfig) -> str:
    """Why the latest attempt of the run stopped itself ("" when it did not)."""
    records = steplog.read(run_uri(cfg))
    last = max((r["attempt"] for r in records), default=None)
    return next((r["reason"] for r in records if r["attempt"] == last and r.get("event") == "stopped"), "")


def _choose_checkpoint(store: CheckpointStore, cfg: EngineConfig):
    """Rank 0: (checkpoint to start from or None, [(incomplete checkpoint, why)]): this run's
    newest complete checkpoint, else resume_from's newest, else None (a fresh run)."""
    found, rejected = store.latest()
    if found is not None:
        print(f"[engine] run {cfg.run_name}: resuming from {found.uri} (step {found.record['step']})", flush=True)
    elif cfg.resume_from:
        found = find_checkpoint(cfg.resume_from)
        if found is None:
            raise FileNotFoundError(f"resume_from {cfg.resume_from}: no complete engine checkpoint there")
        print(f"[engine] run {cfg.run_name}: no checkpoint of its own; starting from {found.uri} "
              f"(step {found.record['step']}) as resume_from asks", flush=True)
    else:
        print(f"[engine] run {cfg.run_name}: no checkpoint, training from step 1", flush=True)
    return found, rejected


def _param_shapes(module) -> dict[str, list[int]]:
    """Name -> full shape of every parameter (ZeRO-3 keeps the full shape in ds_shape)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}


def _check_same_model(found, mine: dict[str, list[int]]) -> None:
    """Refuse a checkpoint of another model (`mine`: this model's dense parameter shapes) before
    DeepSpeed loads it (a universal checkpoint would otherwise load the parameters the two share
    and ignore the rest)."""
    saved = found.record.get("params")
    if saved is None:  # written before the record held the shapes
        return
    problems = [f"{n} is not in this model" for n in saved if n not in mine]
    problems += [f"{n} is not in the checkpoint" for n in mine if n not in saved]
    problems += [f"{n} has shape {mine[n]} here, {saved[n]} in the checkpoint"
                 for n in mine if n in saved and mine[n] != saved[n]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RuntimeError(f"cannot resume from {found.uri}: it holds another model: {'; '.join(problems[:3])}{more}. "
                           f"Train anew under another run name, or point resume_from at a run of this model.")


def _load(engine, found, elastic: bool, state: dict, rank: int) -> None:
    """DeepSpeed state, engine state and this rank's RNG states from a complete checkpoint."""
    import shutil

    load_dir, tag, tmp = local_copy(found, UNIVERSAL if elastic else "")
    try:
        _, client = engine.load_checkpoint(load_dir, tag=tag)
    except Exception as e:  # a shape or config mismatch surfaces here, deep in DeepSpeed
        raise RuntimeError(f"cannot resume from {found.uri}: {type(e).__name__}: {e}. Was it written by "
                           f"another model or engine config? Train anew under another run name, or "
                           f"point resume_from at a compatible run.") from e
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if client is None:
        raise RuntimeError(f"cannot resume from {found.uri}: DeepSpeed found no checkpoint in it")
    state.update({k: v for k, v in client["engine_state"].items() if k in state})
    rngs = client["rng"]
    if rank < len(rngs):
        _set_rng_state(rngs[rank])
    if rank == 0:
        print(f"[engine] resumed from {found.uri}: step {state['step']}, {state['consumed']:,} samples consumed",
              flush=True)


def _rng_state() -> dict:
    """Every generator training may draw from, on this rank."""
    import random

    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s) -> None:
    import random

    import torch

    if not isinstance(s, dict):  # checkpoints of earlier versions: the torch CPU state only
        torch.set_rng_state(s)
        return
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"][:torch.cuda.device_count()])


def _guard_plain_optimizer(engine) -> None:
    """DeepSpeed's ZeRO, fp16 and bf16 optimizers skip an update whose gradients are not finite
    (their `overflow` flag, read by the engine); a plain torch optimizer (ZeRO-0, fp32) does
    not. Give it the same behaviour: its gradients are already all-reduced when it steps."""
    import torch

    inner = engine.optimizer
    if hasattr(inner, "overflow"):
        return
    step = inner.step

    def guarded_step(*args, **kwargs):
        grads = [p.grad for g in inner.param_groups for p in g["params"] if p.grad is not None]
        inner.overflow = not all(bool(torch.isfinite(g).all()) for g in grads)
        if inner.overflow:
            inner.zero_grad(set_to_none=True)
            return None
        return step(*args, **kwargs)

    inner.overflow = False
    inner.step = guarded_step


def _replicas_identical(engine, cfg: EngineConfig, world: int, tp_rank: int) -> bool:
    """Hash of every rank's full parameters (its shard under tensor parallelism), compared
    across the ranks holding the same shard (collective)."""
    import hashlib

    import deepspeed
    import torch.distributed as dist

    params = list(engine.module.parameters())
    context = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.zero_stage == 3 else nullcontext()
    h = hashlib.sha256()
    with context:
        for name, p in engine.module.named_parameters():
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    hashes = [None] * world
    dist.all_gather_object(hashes, (tp_rank, h.hexdigest()))
    return all(len({h for t, h in hashes if t == shard}) == 1 for shard, _ in hashes)


def _fails_now(cfg: EngineConfig, step: int, rank: int, attempt: int) -> bool:
    """Testing (fail_in_checkpoint): this checkpoint is the first at or after this attempt's kill step."""
    return (rank == cfg.fail_rank and attempt < len(cfg.fail_at_steps)
            and step >= cfg.fail_at_steps[attempt] and step - cfg.checkpoint_every < cfg.fail_at_steps[attempt])


def _param_grad_norms(engine, names: dict[str, str], mpu=None) -> dict[str, float]:
    """Norms of chosen parameters' full gradients (any ZeRO stage; collective under ZeRO-3, and
    over the tensor-parallel group for a sharded parameter)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for metric, name in names.items():
        param = engine.module.get_parameter(name)
        grad = safe_get_full_grad(param)
        if grad is not None:
            square = grad.float().norm() ** 2
            if mpu is not None and getattr(param, "tensor_model_parallel", False):
                dist.all_reduce(square, group=mpu.tp_group)
            out[metric] = float(square.sqrt())
    return out


def _validate(engine, spec, cfg, rank, world, device, group=None) -> tuple[dict[str, float], dict[str, Any]]:
    """(mean of step_fn's loss and other scalar outputs over validation_batches micro-batches per
    replica, examples: this rank's non-scalar outputs of its first batch, e.g. sample responses);
    ({}, {}) when the data has no validation split. rank / world / group: data-parallel."""
    import torch

    from stages.engine.data import ShardSource

    try:
        source = ShardSource(spec.data_uri, "validation")
    except ValueError:
        return {}, {}
    engine.eval()
    sums: dict[str, float] = {}
    examples: dict[str, Any] = {}
    with torch.no_grad():
        for b in range(cfg.validation_batches):
            start = (b * world + rank) * cfg.micro_batch_size
            idx = np.arange(start, start + cfg.micro_batch_size) % source.size
            batch = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in source.rows(idx).items()}
            out = spec.step_fn(engine, batch)
            for k, v in (out if isinstance(out, dict) else {"loss": out}).items():
                if _is_example(v):
                    examples.setdefault(k, v)
                else:
                    sums[k] = sums.get(k, 0.0) + float(v) / cfg.validation_batches
    engine.train()
    return _mean_over_ranks(sums, world, device, group), examples


def _is_example(value) -> bool:
    """A step output that is not a metric (sample texts ...): logged as an artifact at validation."""
    return isinstance(value, (list, tuple, dict, str))


def _log_validation(tracker, examples: dict, step: int) -> None:
    """Rank 0: validation examples to the console (the first few) and as an MLflow artifact."""
    if examples:
        for name, items in examples.items():
            for item in list(items)[:2]:
                print(f"[engine] validation {name} at step {step}: {item}", flush=True)
        tracker.log_artifacts({f"validation/step{step:06d}.json": examples})


def _mean_over_ranks(values: dict[str, float], world: int, device, group=None) -> dict[str, float]:
    """Per-rank scalars averaged over the `world` ranks of `group` (None: all ranks); a collective:
    every rank passes the same keys."""
    import torch
    import torch.distributed as dist

    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def _save(engine, store: CheckpointStore, state: dict, metrics: dict, rt, cfg: EngineConfig, fail: bool,
          shapes: dict[str, list[int]]) -> None:
    """Every rank writes its DeepSpeed files, then rank 0 writes the completion record: a
    checkpoint killed anywhere before that record never counts. `shapes`: the dense model's
    parameter shapes (the record's `params`)."""
    import torch.distributed as dist

    rank, world = rt.rank, rt.world
    rng = [None] * world
    dist.all_gather_object(rng, _rng_state())
    tag = tag_for(state["step"])
    if rank == 0:
        store.clear(tag)  # a partial write of this tag by a killed attempt
    dist.barrier()
    save_dir = store.save_dir()
    engine.save_checkpoint(save_dir, tag=tag, client_state={"engine_state": dict(state), "rng": rng},
                           save_latest=False)
    store.upload(save_dir, tag)
    if fail:
        print(f"[engine] injected failure: rank {rank} exits inside the checkpoint write of {tag}", flush=True)
        os._exit(1)
    dist.barrier()
    if rank == 0:
        store.complete(tag, {"step": state["step"], "consumed": state["consumed"], "world": world,
                             "tensor_parallel": cfg.tensor_parallel, "zero_stage": cfg.zero_stage, "params": shapes})
        store.prune(cfg.keep_checkpoints)
    rt.report(metrics, {"uri": store.uri(tag), "step": state["step"]})


def _export(engine, spec: TrainSpec, cfg: EngineConfig, rank: int, mpu=None) -> dict | None:
    """Rank 0 calls export_fn with the full dense model (gathered under ZeRO-3, merged from the
    first replica's shards under tensor parallelism): the single-file checkpoint every stage reads."""
    import deepspeed
    import torch

    from stages.engine.parallel import gather_dense_state

    if mpu is not None:
        state = gather_dense_state(engine.module, engine.module.config, mpu) if mpu.dp_rank == 0 else None
    else:
        params = list(engine.module.parameters())
        context = (deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.zero_stage == 3
                   else nullcontext())
        with context:
            if rank == 0:
                state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        model = spec.model_factory()
        model.load_state_dict(state)
        return spec.export_fn(model.eval())
    return None


def _maybe_fail(cfg: EngineConfig, step: int, rank: int, attempt: int) -> None:
    if rank == cfg.fail_rank and attempt < len(cfg.fail_at_steps) and step == cfg.fail_at_steps[attempt]:
        print(f"[engine] injected failure: rank {rank} exits at step {step}", flush=True)
        os._exit(1)


def _log_training_data(mlflow, uri: str) -> None:
    """The training data as the run's input in MLflow's lineage (its manifest's config hash as
    the digest when it has one)."""
    import hashlib
    import json

    from stages.data.stage import MANIFEST, dataset_name
    from stages.tracking import log_dataset

    fs, path = storage.resolve(uri)
    try:
        digest = json.loads(storage.read_bytes(fs, posixpath.join(path, MANIFEST)))["config_hash"]
    except (FileNotFoundError, KeyError, ValueError):
        digest = hashlib.sha256(uri.encode()).hexdigest()
    log_dataset(mlflow, uri, dataset_name(uri), digest, context="training")


class _Tracker:
    """MLflow from rank 0, one run that survives restarts (its id is in the checkpoint state)."""

    def __init__(self, spec: TrainSpec, cfg: EngineConfig, state: dict):
        self.mlflow = None
        if not spec.tracking_uri:
            return
        import mlflow

        mlflow.set_tracking_uri(spec.tracking_uri)
        if state["mlflow_run_id"]:
            mlflow.start_run(run_id=state["mlflow_run_id"])
        else:
            from stages.tracking import flatten, log_json, use_experiment

            use_experiment(mlflow, spec.experiment, spec.tracking_uri)
            tags = {"mlflow.parentRunId": spec.parent_run_id} if spec.parent_run_id else None
            run = mlflow.start_run(run_name=cfg.run_name, tags=tags)
            state["mlflow_run_id"] = run.info.run_id
            mlflow.log_params({k: str(v)[:500] for k, v in flatten({**spec.params, "engine": asdict(cfg)}).items()})
            for name, obj in spec.artifacts.items():
                log_json(mlflow, obj, name)
            _log_training_data(mlflow, spec.data_uri)
            if spec.start_metrics:
                mlflow.log_metrics({k: float(v) for k, v in spec.start_metrics.items()}, step=0)
        self.mlflow = mlflow

    def log(self, metrics: dict, step: int) -> None:
        if self.mlflow:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))
                                     and math.isfinite(float(v))}, step=step)

    def log_loss_curve(self, records: list[dict], title: str) -> None:
        """loss_curve.png from the step log: every attempt's losses, so a restart's replayed steps show."""
        records = [r for r in records if "loss" in r and "event" not in r]
        if not self.mlflow or not records:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for attempt in sorted({r["attempt"] for r in records}):
            points = [(r["step"], r["loss"]) for r in records if r["attempt"] == attempt]
            ax.plot(*zip(*points), label=f"attempt {attempt}" if attempt else "first attempt", linewidth=1)
        ax.set(xlabel="step", ylabel="training loss", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        self.mlflow.log_figure(fig, "loss_curve.png")
        plt.close(fig)

    def log_artifacts(self, artifacts: dict[str, Any]) -> None:
        if self.mlflow:
            from stages.tracking import log_json

            for name, obj in artifacts.items():
                log_json(self.mlflow, obj, name)

    def end(self, status: str = "FINISHED") -> None:
        if self.mlflow:
            self.mlflow.end_run(status)
