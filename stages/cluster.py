"""Connecting to Ray: the stages join a running cluster (a job, `ray.init(address=...)`) or
start a local instance sized for what they will schedule."""

from __future__ import annotations

import os


def ensure_ray(min_cpus: int) -> None:
    """Start a local Ray instance when none is connected, with at least `min_cpus` logical CPUs
    (an actor pool or train workers plus the tasks around them; RAY_NOTES.md: a pipeline whose
    reads are starved of CPUs hangs). Worker output is forwarded to this console."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # a `ray job submit` driver, or a user pointing at a cluster
        ray.init(configure_logging=False)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 2, min_cpus), include_dashboard=False, configure_logging=False)
