"""The one training loop, run by every Ray Train worker. Stages plug in a TrainSpec.

Exact resume: the batch of a step is a function of the consumed-sample count (engine-owned
data position), every rank's torch RNG state is gathered into the checkpoint, and DeepSpeed
restores model, optimizer and LR schedule. A killed run therefore replays the same losses.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
import os
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from stages.engine.config import EngineConfig

TAG_FILE = "engine_tag.txt"
STEP_LOG = "steps.jsonl"


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
    """engine.step() calls per engine step (iteration_fn stages), so the LR schedule spans the run."""
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
    flops_per_token: float = 0.0
    """Model FLOPs per trained token (6N + attention) for MFU; 0 = not reported."""
    hardware_flops_per_token: float = 0.0
    """FLOPs actually executed per token (with activation recomputation) for HFU; 0 = same as model FLOPs."""
    grad_norm_params: dict[str, str] = field(default_factory=dict)
    """Extra gradient norms to report: metric name -> parameter name (e.g. the embedding, for EGS)."""
    artifacts: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable objects logged to the MLflow run when it is created (name -> object)."""
    start_metrics: dict[str, float] = field(default_factory=dict)
    """Metrics logged at step 0 when the MLflow run is created (e.g. data counts)."""
    nonfinite_steps: list[int] = field(default_factory=list)
    """Testing: steps whose loss is replaced by NaN."""


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
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))


def lr_lambda(cfg: EngineConfig, steps_per_step: int = 1) -> Callable[[int], float]:
    """Warm-up then cosine over the run's optimizer steps (train_steps x steps_per_step)."""
    o = cfg.optim
    total = cfg.train_steps * steps_per_step

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: EngineConfig) -> dict:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer and cfg.zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def train_loop(config: dict) -> None:
    """Entry point of each Ray Train worker."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from stages.engine.data import ShardSource

    spec: TrainSpec = config["spec"]
    cfg: EngineConfig = config["engine"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if torch.cuda.is_available() and cfg.use_gpu is not False \
        else torch.device("cpu")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = spec.model_factory()
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, spec.optimizer_steps_per_step))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg))
    torch.manual_seed(cfg.seed * 1000 + rank + 1)  # dropout differs per rank

    source = ShardSource(spec.data_uri, "train", cfg.seed, cfg.skip_data_ranges)
    state = {"step": 0, "consumed": 0, "skipped_steps": 0, "mlflow_run_id": None, "attempt": 0, "stage": {}}
    run_dir = _run_dir(cfg)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and (found := latest_complete_checkpoint(run_dir, world)):
        # A checkpoint reported just before a crash can be persisted but not yet registered
        # by the controller: use the newest complete one on storage rather than start over.
        checkpoint = ray.train.Checkpoint.from_directory(found)
    if checkpoint:
        with checkpoint.as_directory() as d:
            tag = open(os.path.join(d, TAG_FILE)).read().strip()
            _, client = engine.load_checkpoint(d, tag=tag)
        state.update(client["engine_state"])  # includes the iteration_fn's stage state
        state["attempt"] += 1
        torch.set_rng_state(client["rng"][rank])
        if rank == 0:
            print(f"[engine] resumed from {tag}: step {state['step']}, {state['consumed']:,} samples consumed", flush=True)

    tracker = _Tracker(spec, cfg, state) if rank == 0 else None
    if cfg.validate_at_start and state["step"] == 0:
        val, examples = _validate(engine, spec, cfg, rank, world, device)
        val = {f"val_{k}": v for k, v in val.items()}
        if rank == 0:
            print("[engine] validation before training: " + "  ".join(f"{k} {v:.4f}" for k, v in val.items()), flush=True)
            tracker.log(val, 0)
            _log_validation(tracker, examples, 0)
    grad_history: list[float] = []
    t_last, tokens_since = time.time(), 0
    while state["step"] < cfg.train_steps:
        step = state["step"]
        _maybe_fail(cfg, step, rank, state["attempt"])
        t_step = time.time()
        micro = cfg.micro_batch_at(step)  # DeepSpeed's micro-batch size is bookkeeping only
        indices, consumed = source.indices(state["consumed"], cfg.global_batch_at(step))
        per_rank = micro * cfg.grad_accum_steps
        mine = indices[rank * per_rank:(rank + 1) * per_rank]
        step_tokens = source.tokens(indices)  # the whole global batch, every rank's share
        tokens_since += step_tokens
        losses, nonfinite, extra_norms, sums = [], 0, {}, {}
        if spec.iteration_fn is not None:
            batch = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in source.rows(mine).items()}
            context = IterationContext(step=step, rank=rank, world=world, seed=cfg.seed, state=state["stage"])
            out = spec.iteration_fn(engine, batch, context)
            losses.append(torch.as_tensor(float(out["loss"])))
            sums = {k: float(v) for k, v in out.items() if k != "loss"}
        for m in range(cfg.grad_accum_steps if spec.iteration_fn is None else 0):
            rows = source.rows(mine[m * micro:(m + 1) * micro])
            batch = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in rows.items()}
            loss = spec.step_fn(engine, batch)
            if isinstance(loss, dict):
                for k, v in loss.items():
                    if k != "loss" and not _is_example(v):
                        sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum_steps
                loss = loss["loss"]
            if step in spec.nonfinite_steps:
                loss = loss * float("nan")
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device)
            dist.all_reduce(bad)
            if bad.item() > 0:  # no backward: this micro-batch contributes nothing
                nonfinite += 1
                if cfg.grad_accum_steps == 1:
                    break  # no engine.step either: the whole step is skipped
                engine.step()
                continue
            engine.backward(loss)
            if m == cfg.grad_accum_steps - 1:
                extra_norms = _param_grad_norms(engine, spec.grad_norm_params)
            engine.step()
            losses.append(loss.detach().float())
        state["consumed"] = consumed
        state["step"] += 1
        if nonfinite == cfg.grad_accum_steps:
            state["skipped_steps"] += 1
        mean_loss = torch.stack(losses).mean() if losses else torch.tensor(float("nan"))
        total = torch.tensor([mean_loss.item() if losses else 0.0, 1.0 if losses else 0.0], device=device)
        dist.all_reduce(total)
        metrics = {
            "step": state["step"], "loss": (total[0] / total[1]).item() if total[1] > 0 else float("nan"),
            "lr": scheduler.get_last_lr()[0], "consumed_samples": state["consumed"],
            "skipped_steps": state["skipped_steps"], "nonfinite_microbatches": nonfinite,
            "global_batch": len(indices),
        }
        metrics.update(extra_norms)
        stage_metrics = _mean_over_ranks(sums, world, device)  # collective: every rank
        metrics.update(stage_metrics)
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None and nonfinite < cfg.grad_accum_steps:
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
            _append_step(run_dir, {"step": state["step"], "loss": metrics["loss"], "attempt": state["attempt"],
                                   "seconds": time.time() - t_step, "time": time.time(),
                                   "tokens": step_tokens, "metrics": stage_metrics,
                                   "indices": [int(i) for i in indices]})
        done = state["step"] == cfg.train_steps
        if cfg.validate_every and (state["step"] % cfg.validate_every == 0 or done):
            val, examples = _validate(engine, spec, cfg, rank, world, device)
            metrics.update({f"val_{k}": v for k, v in val.items()})
            if rank == 0:
                _log_validation(tracker, examples, state["step"])
        if state["step"] % cfg.log_every == 0 or done or state["step"] == 1:
            elapsed = time.time() - t_last
            metrics["tokens_per_s"] = tokens_since / max(elapsed, 1e-9)
            if spec.flops_per_token and cfg.peak_flops_per_worker:
                peak = cfg.peak_flops_per_worker * world
                metrics["mfu"] = metrics["tokens_per_s"] * spec.flops_per_token / peak
                metrics["hfu"] = metrics["tokens_per_s"] * (spec.hardware_flops_per_token or spec.flops_per_token) / peak
            t_last, tokens_since = time.time(), 0
            if rank == 0:
                print("[engine] " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in metrics.items()), flush=True)
                tracker.log(metrics, state["step"])
        if state["step"] % cfg.checkpoint_every == 0 or done:
            _save_and_report(engine, state, metrics, rank, world)

    if spec.export_fn is not None:
        artifacts = _export(engine, spec, cfg, rank)
        if tracker and artifacts:
            tracker.log_artifacts(artifacts)
    if tracker:
        tracker.log_loss_curve(run_dir, cfg.run_name)
        tracker.end()


def _param_grad_norms(engine, names: dict[str, str]) -> dict[str, float]:
    """Norms of chosen parameters' full gradients (any ZeRO stage; collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for metric, name in names.items():
        grad = safe_get_full_grad(engine.module.get_parameter(name))
        if grad is not None:
            out[metric] = float(grad.float().norm())
    return out


def _validate(engine, spec, cfg, rank, world, device) -> tuple[dict[str, float], dict[str, Any]]:
    """(mean of step_fn's loss and other scalar outputs over validation_batches micro-batches per
    rank, examples: this rank's non-scalar outputs of its first batch, e.g. sample responses);
    ({}, {}) when the data has no validation split."""
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
    return _mean_over_ranks(sums, world, device), examples


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


def _mean_over_ranks(values: dict[str, float], world: int, device) -> dict[str, float]:
    """Per-rank scalars averaged over ranks (a collective: every rank passes the same keys)."""
    import torch
    import torch.distributed as dist

    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def _save_and_report(engine, state, metrics, rank, world) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    rng = [None] * world
    dist.all_gather_object(rng, torch.get_rng_state())
    tag = f"step{state['step']:08d}"
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=tag, client_state={"engine_state": dict(state), "rng": rng})
        if rank == 0:
            with open(os.path.join(d, TAG_FILE), "w") as f:
                f.write(tag)
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def _export(engine, spec: TrainSpec, cfg: EngineConfig, rank: int) -> dict | None:
    import deepspeed
    import torch

    params = list(engine.module.parameters())
    context = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.zero_stage == 3 else nullcontext()
    with context:
        if rank == 0:
            state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        model = spec.model_factory()
        model.load_state_dict(state)
        return spec.export_fn(model.eval())
    return None


def latest_complete_checkpoint(run_dir: str, world: int) -> str | None:
    """The newest checkpoint directory under a local run directory holding the tag file and
    every rank's DeepSpeed files (remote storage relies on Ray's registered checkpoint)."""
    if "://" in run_dir or not os.path.isdir(run_dir):
        return None
    for name in sorted((n for n in os.listdir(run_dir) if n.startswith("checkpoint_")), reverse=True):
        path = os.path.join(run_dir, name)
        tag_file = os.path.join(path, TAG_FILE)
        if not os.path.exists(tag_file):
            continue
        tag_dir = os.path.join(path, open(tag_file).read().strip())
        files = os.listdir(tag_dir) if os.path.isdir(tag_dir) else []
        optim = [f for f in files if f.endswith("optim_states.pt")]
        if any(f.endswith("model_states.pt") for f in files) and len(optim) in (0, world):
            return path
    return None


def _run_dir(cfg: EngineConfig) -> str:
    from stages import storage

    _, path = storage.resolve(cfg.storage_path)
    return posixpath.join(path, cfg.run_name)


def _append_step(run_dir: str, record: dict) -> None:
    """One line per step (all attempts) in <storage>/<run>/steps.jsonl, for loss-curve and data audits."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, STEP_LOG), "a") as f:
        f.write(json.dumps(record) + "\n")


def _maybe_fail(cfg: EngineConfig, step: int, rank: int, attempt: int) -> None:
    if rank == cfg.fail_rank and attempt < len(cfg.fail_at_steps) and step == cfg.fail_at_steps[attempt]:
        print(f"[engine] injected failure: rank {rank} exits at step {step}", flush=True)
        os._exit(1)


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
            mlflow.set_experiment(spec.experiment)
            tags = {"mlflow.parentRunId": spec.parent_run_id} if spec.parent_run_id else None
            run = mlflow.start_run(run_name=cfg.run_name, tags=tags)
            state["mlflow_run_id"] = run.info.run_id
            from stages.tracking import flatten

            mlflow.log_params({k: str(v)[:500] for k, v in flatten({**spec.params, "engine": asdict(cfg)}).items()})
            for name, obj in spec.artifacts.items():
                mlflow.log_dict(obj, name)
            if spec.start_metrics:
                mlflow.log_metrics({k: float(v) for k, v in spec.start_metrics.items()}, step=0)
        self.mlflow = mlflow

    def log(self, metrics: dict, step: int) -> None:
        if self.mlflow:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))
                                     and math.isfinite(float(v))}, step=step)

    def log_loss_curve(self, run_dir: str, title: str) -> None:
        """loss_curve.png from steps.jsonl: every attempt's losses, so a restart's replayed steps show."""
        if not self.mlflow or not os.path.exists(os.path.join(run_dir, STEP_LOG)):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(os.path.join(run_dir, STEP_LOG)) as f:
            records = [json.loads(line) for line in f]
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
            for name, obj in artifacts.items():
                self.mlflow.log_dict(obj, name)

    def end(self) -> None:
        if self.mlflow:
            self.mlflow.end_run()
