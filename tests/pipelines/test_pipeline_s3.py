"""The pipeline with its work_dir on an S3-compatible server started here (moto's server mode,
over HTTP at 127.0.0.1; pyarrow's `FileSystem.from_uri` reaches it through AWS_ENDPOINT_URL).
Run as `python pipelines/full.py` in a subprocess, as a job runs it, from an empty working
directory and with Ray's temp dir of its own: every output lands in the bucket and no local
path is derived from a URI (storage.resolve strips `s3://`: a stray write makes `<bucket>/...`
relative to some working directory); no process of its Ray instance is left behind."""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest
import yaml

from conftest import REPO, SAMPLE, free_port

pytestmark = pytest.mark.integration
BUCKET = f"glm-s3-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with an empty bucket; (env for the pipeline, file system)."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    yield env, fs
    server.stop()


def pipeline_config(tmp_path, tokenizer, stages: list[str]) -> dict:
    engine = {"num_workers": 2, "micro_batch_size": 2, "train_steps": 2, "checkpoint_every": 2, "zero_stage": 2,
              "log_every": 1}
    return {
        "name": "s3", "work_dir": f"s3://{BUCKET}/runs/{{name}}", "stages": stages,
        "data": {"sources": [{"uri": str(SAMPLE / "pretrain/en_tinyshakespeare.jsonl")}],
                 "tokenizer": {"path": str(tokenizer.save(tmp_path))},
                 "objective": {"seq_len": 64, "mask_window": 32}, "mip": {"token_share": 0.0}, "num_buckets": 2},
        "pretrain": {"model": {"preset": "tiny"}, "engine": engine},
        "quantize": {"bits": 4, "sample_max_new_tokens": 2,
                     "gate": {"text": str(SAMPLE / "pretrain/en_tinyshakespeare.jsonl"), "max_tokens": 256,
                              "window": 64, "max_ppl_increase": 10.0}},
        "eval": {"tasks": [str(REPO / "stages/eval/tasks/en/boolq.yaml")], "max_items": 2, "parallel": "local"},
        "eval_after": ["quantize"],
        "tracking": {"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "s3"},
        "registry": {"name": ""}, "check": {"max_tokens": 2, "require_sensible": False},
    }


def run_pipeline(tmp_path, env: dict, config: dict, marker: str, ray_tmp: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{marker}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    cwd = tmp_path / f"cwd-{marker}"  # empty: a relative path derived from a URI would land here
    cwd.mkdir()
    run_env = {**os.environ, **env, "PYTHONPATH": str(REPO), "GLM_TEST_MARKER": marker, "RAY_TMPDIR": ray_tmp}
    run_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(REPO / "pipelines/full.py"), "--config", str(path)], cwd=cwd,
                          env=run_env, capture_output=True, text=True, timeout=560)


def s3_files(fs, prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path.removeprefix(f"{BUCKET}/") for i in infos if i.type == pafs.FileType.File)


def stray_local_paths(*roots) -> list[str]:
    """Paths named after the bucket under the given folders (what a URI stripped of s3:// makes)."""
    found = []
    for root in roots:
        for dirpath, dirnames, _ in os.walk(root):
            found += [os.path.join(dirpath, d) for d in dirnames if d.startswith(BUCKET)]
            dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", "node_modules")]
    return found


def processes_with_marker(marker: str) -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("GLM_TEST_MARKER") == marker and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


@pytest.fixture(scope="module")
def s3_pipeline(s3, tmp_path_factory, tokenizer):
    """data -> pretrain -> quantize -> eval, everything under s3://BUCKET/runs/s3 (the engine's
    storage too: <work_dir>/ray), run once; (config, finished process, files in the bucket,
    stray local paths in the temp dir, repo and Ray's temp dir, processes left)."""
    env, fs = s3
    tmp = tmp_path_factory.mktemp("s3")
    ray_tmp = tempfile.mkdtemp(prefix="rays3", dir="/tmp")  # short: Ray's socket paths have a length limit
    config = pipeline_config(tmp, tokenizer, ["data", "pretrain", "quantize"])
    try:
        done = run_pipeline(tmp, env, config, "s3-pipeline", ray_tmp)
        yield (config, done, s3_files(fs, "runs/s3"), stray_local_paths(tmp, REPO, ray_tmp),
               processes_with_marker("s3-pipeline"), sorted(os.listdir(tmp / "cwd-s3-pipeline")))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_pipeline_with_its_work_dir_on_s3(s3_pipeline, s3):
    import mlflow

    config, done, files, stray, left, cwd = s3_pipeline
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    for expected in ("runs/s3/data/manifest.json", "runs/s3/data/tokenizer.model",
                     "runs/s3/pretrain/model/config.json", "runs/s3/pretrain/model/model.safetensors",
                     "runs/s3/quantize/model/config.json",
                     "runs/s3/pipeline/data.json", "runs/s3/pipeline/pretrain.json", "runs/s3/pipeline/quantize.json",
                     "runs/s3/pipeline/eval-quantize.json"):
        assert expected in files, (expected, files)
    assert any(f.startswith("runs/s3/data/train/") for f in files)
    assert any(f.startswith("runs/s3/eval/quantize-") and f.endswith(".json") for f in files)  # a report per run
    assert any(f.startswith("runs/s3/ray/s3-pretrain-") and "/checkpoints/step" in f for f in files)  # the engine's
    assert not [f for f in files if ".partial/" in f or ".old/" in f]  # checkpoints published whole
    marker = json.loads(s3[1].open_input_stream(f"{BUCKET}/runs/s3/pipeline/quantize.json").read())
    assert marker["outputs"]["model"] == f"s3://{BUCKET}/runs/s3/quantize/model"

    # nothing written to a local path made from a URI
    assert stray == []
    assert cwd in ([], ["mlruns"], ["mlartifacts"])  # the working directory holds MLflow's local artifacts at most
    assert left == []  # no Ray process left behind (issue 14, item 9)

    client = mlflow.MlflowClient(config["tracking"]["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("s3").experiment_id])
    [parent] = [r for r in runs if r.info.run_name == "s3"]
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"data", "quantize", "eval-quantize"} <= children and parent.info.status == "FINISHED"
    assert any(c.startswith("s3-pretrain-") for c in children)


def test_the_engine_step_log_goes_to_the_bucket(s3_pipeline):
    _, done, files, stray, _, _ = s3_pipeline
    assert done.returncode == 0
    assert [p for p in stray if "/artifacts/s3-pretrain-" in p] == []
    assert any(f.startswith("runs/s3/ray/s3-pretrain-") and "/steps/attempt-" in f for f in files), files
    assert any(f.startswith("runs/s3/ray/s3-pretrain-") and f.endswith("/COMPLETE.json") for f in files), files
