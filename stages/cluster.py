"""Connecting to Ray: the stages join a running cluster (a job, `ray.init(address=...)`) or
start a local instance sized for what they will schedule, and shut a local instance down
without leaving its worker processes behind."""

from __future__ import annotations

import atexit
import os
import time


def ensure_ray(min_cpus: int) -> None:
    """Start a local Ray instance when none is connected, with at least `min_cpus` logical CPUs
    (an actor pool or train workers plus the tasks around them; RAY_NOTES.md: a pipeline whose
    reads are starved of CPUs hangs). Worker output is forwarded to this console. A local
    instance is shut down with `shutdown_ray` when this process exits."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # a `ray job submit` driver, or a user pointing at a cluster
        ray.init(configure_logging=False)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 2, min_cpus), include_dashboard=False, configure_logging=False)
        atexit.register(shutdown_ray)  # runs before Ray's own exit hook (registered at import)


def require_resources(need: dict[str, float], what: str, timeout_s: float | None = None) -> None:
    """Wait until the Ray cluster has at least `need` in total (an autoscaler may be adding
    nodes), at most `timeout_s` (default $GLM_RESOURCE_WAIT_S, else 120 s); then RuntimeError
    naming what is missing, instead of a job that waits forever for a placement it cannot get."""
    import ray

    need = {k: v for k, v in need.items() if v > 0}
    timeout_s = float(os.environ.get("GLM_RESOURCE_WAIT_S", 120)) if timeout_s is None else timeout_s
    deadline, said = time.time() + timeout_s, 0.0
    while True:
        have = ray.cluster_resources()
        missing = {k: v - have.get(k, 0.0) for k, v in need.items() if have.get(k, 0.0) < v}
        if not missing:
            return
        text = ", ".join(f"{k} {need[k]:g} (cluster total {have.get(k, 0.0):g})" for k in missing)
        if time.time() >= deadline:
            raise RuntimeError(f"{what} needs {text}: the Ray cluster never had that within {timeout_s:.0f} s. "
                               "Lower the stage's num_workers / cpus_per_worker (or use_gpu), or add nodes "
                               "(GLM_RESOURCE_WAIT_S sets how long to wait for an autoscaler)")
        if time.time() - said > 30:
            print(f"waiting for the Ray cluster: {what} needs {text}", flush=True)
            said = time.time()
        time.sleep(2)


def shutdown_ray(grace_s: float = 10.0) -> list[int]:
    """`ray.shutdown()`, then, when this process had started the local instance, end the worker
    processes of that instance that outlived it; returns their pids.

    Why: `ray.shutdown()` gives the raylet one second after SIGTERM to stop its workers, then
    SIGKILLs it; on a busy machine that second runs out, and a worker whose raylet was killed
    keeps running with parent PID 1 (an async actor such as Ray Train's `TrainController`
    does: checked by SIGKILLing a raylet under a live async actor, still alive 15 s later).
    Such workers are found by the raylet pid Ray puts in their environment (RAY_RAYLET_PID),
    so nothing of another Ray instance on the machine is touched."""
    import ray

    if not ray.is_initialized():
        return []
    raylet_pid = _local_raylet_pid()
    children = _children(raylet_pid) if raylet_pid is not None else []
    ray.shutdown()
    return [] if raylet_pid is None else _end_workers_of(raylet_pid, children, grace_s)


def _local_raylet_pid() -> int | None:
    """The pid of the raylet this process started (None when it joined a running cluster)."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    infos = node.all_processes.get("raylet", []) if node is not None else []
    return infos[0].process.pid if infos else None


def _children(pid: int) -> list:
    """The raylet's processes (workers, agents) while it is alive."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _end_workers_of(raylet_pid: int, children: list, grace_s: float) -> list[int]:
    """End what the raylet started and is still running: its children seen before the shutdown
    (workers and agents), and any process whose environment names it (RAY_RAYLET_PID: workers
    started after that look)."""
    import psutil

    left = [p for p in children if _running(p)]
    for proc in psutil.process_iter():
        if proc in left:
            continue
        try:
            if proc.pid != os.getpid() and proc.environ().get("RAY_RAYLET_PID") == str(raylet_pid) \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    if not left:
        return []
    stuck = _wait(left, 2.0)  # workers of a raylet that stopped them are on their way out
    for proc in stuck:
        _signal(proc, "terminate")
    killed = _wait(stuck, grace_s)
    for proc in killed:
        _signal(proc, "kill")
    _wait(killed, 5.0)
    if not stuck:
        return []
    pids = [p.pid for p in stuck]
    print(f"ray: ended {len(pids)} worker process(es) the local Ray instance left behind: {pids}", flush=True)
    return pids


def _signal(proc, how: str) -> None:
    import psutil

    try:
        getattr(proc, how)()
    except psutil.NoSuchProcess:
        pass


def _wait(procs: list, timeout_s: float) -> list:
    """Those of `procs` still running after up to `timeout_s` (a zombie counts as ended)."""
    deadline = time.time() + timeout_s
    while True:
        procs = [p for p in procs if _running(p)]
        if not procs or time.time() >= deadline:
            return procs
        time.sleep(0.2)


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
