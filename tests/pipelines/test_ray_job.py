"""`ray job submit -- python pipelines/full.py` against a real local Ray head (`ray start --head`):
the job succeeds and MLflow holds the parent run, the nested stage runs and a registered model."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import yaml

from conftest import REPO, SAMPLE, free_port

pytestmark = pytest.mark.integration
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture(scope="module")
def head():
    """A Ray head of its own (free ports for every server it starts, and its own temp dir, so it
    neither collides with nor is joined by another Ray on this machine);
    token auth off for this local test cluster (RAY_NOTES.md)."""
    temp = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ports = [f"--{name}={free_port()}" for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", *ports, "--dashboard-port", str(dashboard),
         "--include-dashboard", "true", "--num-cpus", "4", "--temp-dir", temp, "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("the Ray head did not start")
            time.sleep(1)
    yield address, env
    os.killpg(proc.pid, signal.SIGKILL)  # a throwaway cluster: no 30 s drain (its workers die with the raylet)
    proc.wait(timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


def test_submitted_pipeline_job_runs_and_is_tracked(head, tmp_path, tokenizer):
    import mlflow

    address, env = head
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    engine = {"num_workers": 2, "micro_batch_size": 2, "train_steps": 2, "checkpoint_every": 2, "zero_stage": 2}
    config = {
        "name": "job", "work_dir": str(tmp_path / "work"), "stages": ["data", "pretrain"],
        "data": {"sources": [{"uri": str(SAMPLE / "pretrain/en_tinyshakespeare.jsonl")}],
                 "tokenizer": {"path": str(tokenizer.save(tmp_path))},
                 "objective": {"seq_len": 64, "mask_window": 32}, "mip": {"token_share": 0.0}, "num_buckets": 2},
        "pretrain": {"model": {"preset": "tiny"}, "engine": engine},
        # relative: resolved in the job's working directory, the uploaded copy of the repo
        "eval": {"tasks": ["stages/eval/tasks/en/boolq.yaml"], "max_items": 4},
        "tracking": {"enabled": True, "tracking_uri": tracking, "experiment": "job"},
        "check": {"max_tokens": 2},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    for _ in range(30):  # the head's job agent comes up a little after its dashboard
        done = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
             sys.executable, "pipelines/full.py", "--config", str(path)],
            env=env, capture_output=True, text=True, timeout=600)
        log = done.stdout + done.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(2)
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log and "== pretrain done" in log

    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("job").experiment_id])
    [parent] = [r for r in runs if r.info.run_name == "job"]
    assert parent.info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    [pretrain] = children - {"data", "eval-pretrain"}  # the engine run, named by its config hash
    assert children >= {"data", "eval-pretrain"} and pretrain.startswith("job-pretrain-")
    version = client.get_model_version_by_alias("glm-chat", "newest")
    assert version.source == str(tmp_path / "work/pretrain/model")
