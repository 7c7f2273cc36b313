"""A local Ray head for `ray job submit`, started and stopped without touching any other Ray
on the machine.

    make cluster-up      (= python -m pipelines.local_cluster up)     start it, print the submit command
    make cluster-down    (= python -m pipelines.local_cluster down)   stop it, and only it
    python -m pipelines.local_cluster status

What a plain `ray start --head` gets wrong for this repo, and this does instead:
- the job's `python` is this checkout's .venv interpreter (the head's PATH starts with .venv/bin);
- its own temporary directory and free ports for every server (a second Ray on the machine
  holds the defaults: `No available agent to submit job`), the dashboard on 8265 when free;
- token authentication off (Ray 2.59+ turns it on once ~/.ray/auth_token exists and a plain
  submit then fails; the dashboard and job API listen on localhost only, Ray's default);
- jobs write their outputs under this checkout's runs/ and track to its mlflow.db
  (GLM_JOB_BASE_DIR, MLFLOW_TRACKING_URI: pipelines/jobs.py), so `mlflow ui` here shows them;
- `down` stops this head's process group and the workers of its raylet, not every Ray
  process on the machine as `ray stop` does.
State: .ray-cluster/cluster.json (address, pid, temp dir; $GLM_CLUSTER_STATE_DIR moves it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("GLM_CLUSTER_STATE_DIR", REPO / ".ray-cluster")) / "cluster.json"
SERVERS = ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
           "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port")


def _free_port(preferred: int = 0) -> int:
    import socket

    for port in ((preferred, 0) if preferred else (0,)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _read_state() -> dict | None:
    if not STATE.exists():
        return None
    state = json.loads(STATE.read_text())
    return state if _alive(state["pid"]) else None


def up(num_cpus: int, dashboard_port: int, timeout_s: float, base: Path = REPO) -> int:
    if (state := _read_state()) is not None:
        print(f"a head started from this checkout is running: {state['address']} (pid {state['pid']}); "
              "`make cluster-down` stops it")
        return 0
    bin_dir = Path(sys.executable).parent
    temp = Path(f"/tmp/glm-ray-{os.getuid()}-{_free_port()}")  # short: Ray's socket paths are length-limited
    dashboard = _free_port(dashboard_port)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
           "GLM_JOB_BASE_DIR": str(base), "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}",
           "VIRTUAL_ENV": str(bin_dir.parent)}
    env.pop("RAY_ADDRESS", None)
    STATE.parent.mkdir(exist_ok=True)
    log = open(STATE.parent / "head.log", "wb")
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block",
           *[f"--{name}={_free_port()}" for name in SERVERS], "--dashboard-port", str(dashboard),
           "--include-dashboard", "true", "--num-cpus", str(num_cpus), "--temp-dir", str(temp),
           "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    print(f"starting a Ray head with {num_cpus} CPUs (log: {log.name}) ...", flush=True)
    deadline = time.time() + timeout_s
    while not _agent_ready(address):
        if proc.poll() is not None or time.time() > deadline:
            _stop_group(proc.pid)
            print(f"error: the Ray head did not come up within {timeout_s:.0f} s; see {log.name}", file=sys.stderr)
            return 1
        time.sleep(1)
    STATE.write_text(json.dumps({"pid": proc.pid, "address": address, "temp_dir": str(temp), "num_cpus": num_cpus}))
    print(f"Ray head ready at {address} (pid {proc.pid}, temp dir {temp})\n"
          f"submit the smoke pipeline with:\n"
          f"  .venv/bin/ray job submit --address {address} --working-dir . -- \\\n"
          f"      python pipelines/full.py --config pipelines/configs/smoke.yaml\n"
          f"jobs use {bin_dir / 'python'}, write under {base / 'runs'} and track to sqlite:///{base / 'mlflow.db'}\n"
          f"stop it with: make cluster-down")
    return 0


def _agent_ready(address: str) -> bool:
    """The head's job agent answers (it comes up a little after the dashboard)."""
    try:
        with urllib.request.urlopen(f"{address}/api/jobs/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop_group(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the head's process group, wait (at most `grace_s`) for the raylet to go, end the
    raylet's workers that outlived it, then SIGKILL whatever of the group is left. A longer grace
    buys nothing here: a local head keeps no state worth a graceful stop, and Ray's servers take
    10-25 s to leave after SIGTERM (`ray start --block` waits for them)."""
    import psutil

    from stages.cluster import _end_workers_of

    raylets = [p for p in _tree(pid) if p.name() == "raylet"]
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + grace_s
    while time.time() < deadline and any(_running(p) for p in raylets):
        time.sleep(0.2)
    for raylet in raylets:
        _end_workers_of(raylet.pid, [], 5.0)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        psutil.Process(pid).wait(timeout=10)
    except (psutil.NoSuchProcess, psutil.TimeoutExpired):
        pass


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tree(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def down() -> int:
    if not STATE.exists():
        print("no Ray head started from this checkout")
        return 0
    state = json.loads(STATE.read_text())
    if _alive(state["pid"]):
        print(f"stopping the Ray head at {state['address']} (pid {state['pid']}) ...", flush=True)
        _stop_group(state["pid"])
    STATE.unlink()
    import shutil

    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    print("stopped")
    return 0


def status() -> int:
    state = _read_state()
    if state is None:
        print("no Ray head started from this checkout is running")
        return 1
    print(f"running: {state['address']} (pid {state['pid']}, {state['num_cpus']} CPUs, temp dir {state['temp_dir']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.local_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start the head (no-op when it runs)")
    start.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2,
                       help="logical CPUs of the head (default: this machine's)")
    start.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / job API port, if free")
    start.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the head")
    start.add_argument("--base-dir", type=Path, default=REPO,
                       help="where jobs put relative outputs (runs/) and mlflow.db (default: this checkout)")
    sub.add_parser("down", help="stop the head started from this checkout (and only it)")
    sub.add_parser("status", help="is it running, and where")
    args = parser.parse_args(argv)
    if args.command == "up":
        return up(args.num_cpus, args.dashboard_port, args.timeout, args.base_dir.resolve())
    return down() if args.command == "down" else status()


if __name__ == "__main__":
    sys.exit(main())
