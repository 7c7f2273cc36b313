"""Shutting down a local Ray instance leaves no process of it behind (issue 14, item 9)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration

# A local instance whose raylet and GCS are SIGKILLed, which is what ray.shutdown() does when
# their one-second grace after SIGTERM runs out on a busy machine: the raylet's processes
# (agents, workers such as Ray Train's TrainController) then run on with parent PID 1.
SCRIPT = """
import os, signal, time
import psutil
import ray
from stages.cluster import ensure_ray, shutdown_ray

ensure_ray(1)

@ray.remote(num_cpus=0)
class Controller:
    async def pid(self):
        return os.getpid()

actor = Controller.remote()
ray.get(actor.pid.remote())
node = ray._private.worker._global_node
started = psutil.Process(node.all_processes["raylet"][0].process.pid).children(recursive=True)
# ray.shutdown() without the one-second grace: the raylet and GCS are SIGKILLed at once
kill_all = type(node).kill_all_processes
type(node).kill_all_processes = lambda self, check_alive=True, allow_graceful=False, wait=False: \
    kill_all(self, check_alive, False, wait)
ended = shutdown_ray(grace_s=5)
left = [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
print("ENDED", ended, "LEFT", left, flush=True)
"""


def test_shutdown_leaves_no_process_of_the_local_instance(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180, env=env)
    line = next((l for l in done.stdout.splitlines() if l.startswith("ENDED")), "")
    assert done.returncode == 0 and line, done.stdout[-2000:] + done.stderr[-3000:]
    # Whether the SIGKILL orphans processes depends on timing (on a busy machine it did, on a
    # quiet one the agents may exit with the raylet: "ENDED []"); either way none may be left.
    assert line.endswith("LEFT []"), line
