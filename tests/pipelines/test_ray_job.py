"""`ray job submit -- python pipelines/full.py` against a real local Ray head started by `make
cluster-up` with 2 CPUs: the job succeeds and MLflow holds the parent run, the nested stage runs
and a registered model; `make cluster-down` leaves nothing of that head running."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, SAMPLE, free_port

pytestmark = pytest.mark.integration
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head started the documented way (`make cluster-up` = `python -m pipelines.local_cluster
    up`) with 2 CPUs, like a 2-core machine; its state and the jobs' base directory in a
    temporary directory instead of the checkout. Stopped with `down`."""
    base = tmp_path_factory.mktemp("jobbase")
    env = {**os.environ, "GLM_CLUSTER_STATE_DIR": str(base / "state")}
    env.pop("RAY_ADDRESS", None)
    cli = [sys.executable, "-m", "pipelines.local_cluster"]
    up = subprocess.run([*cli, "up", "--num-cpus", "2", "--dashboard-port", str(free_port()), "--base-dir", str(base)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((base / "state/cluster.json").read_text())
    yield state["address"], base, env
    down = subprocess.run([*cli, "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    import psutil

    assert not psutil.pid_exists(state["pid"]) or psutil.Process(state["pid"]).status() == psutil.STATUS_ZOMBIE
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if state["temp_dir"] in " ".join(p.info["cmdline"] or [])]
    assert not left, f"processes of the stopped head left: {left}"


def test_submitted_pipeline_job_runs_and_is_tracked(head, tmp_path, tokenizer):
    """The README's submit command verbatim in form (`python`, no tracking URI, a relative
    work_dir): the job runs with the venv's interpreter on a 2-CPU head, its outputs and MLflow
    runs land in the head's base directory, not in the job's temporary working directory."""
    import mlflow

    address, base, env = head
    tracking = f"sqlite:///{base / 'mlflow.db'}"
    # one training worker: the 2-CPU head's point is the data stage's actors (they once starved its
    # filter); several workers are the engine tests' business
    engine = {"num_workers": 1, "micro_batch_size": 2, "train_steps": 2, "checkpoint_every": 2, "zero_stage": 2}
    config = {
        "name": "job", "stages": ["data", "pretrain"],  # work_dir: the default runs/{name}, relative
        "data": {"sources": [{"uri": str(SAMPLE / "pretrain/en_tinyshakespeare.jsonl")}],
                 "tokenizer": {"path": str(tokenizer.save(tmp_path))},
                 "objective": {"seq_len": 64, "mask_window": 32}, "mip": {"token_share": 0.0}, "num_buckets": 2},
        "pretrain": {"model": {"preset": "tiny"}, "engine": engine},
        # relative: resolved in the job's working directory, the uploaded copy of the repo
        "eval": {"tasks": ["stages/eval/tasks/en/boolq.yaml"], "max_items": 4},
        "tracking": {"enabled": True, "experiment": "job"},  # the store: the head's (make cluster-up)
        "check": {"max_tokens": 2, "require_sensible": False},  # an untrained tiny model answers noise
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    for _ in range(30):  # the head's job agent comes up a little after its dashboard
        done = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
             "python", "pipelines/full.py", "--config", str(path)],
            env=env, capture_output=True, text=True, timeout=600)
        log = done.stdout + done.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(2)
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log and "== pretrain done" in log
    assert f"outputs under {base / 'runs/job'}, MLflow at {tracking}" in log
    assert (base / "runs/job/pretrain/model/config.json").exists()

    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("job").experiment_id])
    [parent] = [r for r in runs if r.info.run_name == "job"]
    assert parent.info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    [pretrain] = children - {"data", "eval-pretrain"}  # the engine run, named by its config hash
    assert children >= {"data", "eval-pretrain"} and pretrain.startswith("job-pretrain-")
    version = client.get_model_version_by_alias("glm-chat", "newest")
    assert version.tags["checkpoint"] == str(base / "runs/job/pretrain/model")

