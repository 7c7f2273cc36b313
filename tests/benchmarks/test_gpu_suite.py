"""benchmarks/gpu_suite.py: the CPU dry run without Ray / DeepSpeed / MLflow (as on the GPU
machine), part 7 with DeepSpeed, and the orchestration (part time limits, the overall budget,
partial results on interruption, $OUT). No timing thresholds: only that the parts run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_suite  # noqa: E402

# Not on the GPU machine: the suite must run without them (its part 7 reports itself skipped).
ABSENT_ON_GPU_MACHINE = ["ray", "deepspeed", "mlflow", "pydantic", "fastapi", "starlette", "lm_eval", "requests",
                         "openai", "pandas"]

# sys.modules[name] = None in this process, then the suite as __main__; GPU_SUITE_BLOCK_IMPORTS
# does the same in every process the suite starts (its parts, pytest, the engine attempts).
BLOCKED_RUN = """
import runpy, sys
for name in {names!r}:
    sys.modules[name] = None
sys.argv = [{suite!r}, *{argv!r}]
runpy.run_path({suite!r}, run_name="__main__")
"""


def run_suite(tmp_path: Path, argv: list[str], block: list[str] | None = None, timeout: float = 900):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OUT": str(tmp_path / "out")}
    if block:
        env[gpu_suite.BLOCK_ENV] = ",".join(block)
        cmd = [sys.executable, "-c", BLOCKED_RUN.format(names=block, suite=str(SUITE), argv=argv)]
    else:
        cmd = [sys.executable, str(SUITE), *argv]
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"suite {argv} took {time.time() - t:.1f} s\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc, result


@pytest.mark.slow
def test_dry_run_without_ray_deepspeed_mlflow(tmp_path):
    # generous limits: CI machines are shared (the suite's own limits are for a quiet run)
    proc, result = run_suite(tmp_path, ["--dry-run", "--out", str(tmp_path / "suite.json"), "--budget-s", "900",
                                        "--part-limit-scale", "5"],
                             block=ABSENT_ON_GPU_MACHINE)
    assert [p["part"] for p in result["parts"]] == [1, 2, 3, 4, 5, 6, 7]
    statuses = {p["name"]: p["status"] for p in result["parts"]}
    assert statuses == {"pytest_gpu": "ok", "pretrain_mfu": "ok", "quant_kernels": "ok", "serve_engine": "ok",
                        "batched_eval": "ok", "ppo_iteration": "ok", "engine_in_process": "skipped"}, statuses
    part7 = result["parts"][6]
    assert "deepspeed cannot be imported" in part7["reason"]
    assert proc.returncode == 0
    assert result["dry_run"] and set(result["blocked_imports"]) == set(ABSENT_ON_GPU_MACHINE)
    for part in result["parts"][:6]:  # no part loaded anything the GPU machine lacks
        assert not set(part["third_party_modules"]) & set(ABSENT_ON_GPU_MACHINE), part["name"]
    # figures of each part are there (measured, not checked against goals)
    parts = {p["name"]: p for p in result["parts"]}
    assert parts["pretrain_mfu"]["runs"][0]["tokens_per_s"] > 0
    assert parts["quant_kernels"]["kernels"]["w4a16"]["speedup_b1"] is not None
    assert set(parts["quant_kernels"]["decode"]) >= {"fp32", "int8", "int4"}
    assert set(parts["serve_engine"]["levels"]) == {"c1", "c8", "c32"}
    assert parts["batched_eval"]["ratio"] > 0 and parts["ppo_iteration"]["same_greedy_outputs"] == 1.0
    # written to --out and to $OUT
    assert json.loads((tmp_path / "suite.json").read_text())["statuses"] == result["statuses"]
    assert json.loads((tmp_path / "out" / "gpu_suite_dry.json").read_text())["statuses"] == result["statuses"]
    assert "[suite] part 7/7" in (tmp_path / "out" / "gpu_suite_dry.log").read_text()


@pytest.mark.slow
@pytest.mark.integration
def test_dry_run_part7_engine_in_one_process_with_deepspeed(tmp_path):
    proc, result = run_suite(tmp_path, ["--dry-run", "--parts", "7", "--out", str(tmp_path / "s.json"),
                                        "--budget-s", "900", "--part-limit-scale", "5"])
    [part] = result["parts"]
    assert part["status"] == "ok", part
    assert part["losses_identical"] is True and part["killed_exit_code"] == 1
    assert part["resumed_from_step"] is not None and part["attempts"] == 2
    assert proc.returncode == 0


def test_help_describes_every_part():
    out = subprocess.run([sys.executable, str(SUITE), "--help"], capture_output=True, text=True, check=True).stdout
    for part in gpu_suite.PARTS:
        assert part.name in out
    assert "--dry-run" in out and "--budget-s" in out


# --- orchestration, with stand-in parts (python -c scripts) -------------------------------

STANDIN = """
import json, sys, time
path, figure, sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
json.dump({"status": "running", "figure": figure}, open(path, "w"))
time.sleep(sleep)
json.dump({"status": "ok", "figure": figure, "done": True}, open(path, "w"))
"""


class StandinSuite(gpu_suite.Suite):
    sleeps: dict[str, float] = {}

    def part_command(self, part, result_file, deadline):
        return [sys.executable, "-c", STANDIN, result_file, str(part.number), str(self.sleeps[part.name])]


def standin_parts(limit: float, limits: dict | None = None) -> list:
    limits = limits or {}
    return [gpu_suite.Part(i, f"p{i}", limits.get(i, limit), limits.get(i, limit), f"stand-in {i}") for i in (1, 2, 3)]


def test_a_part_over_its_limit_is_killed_keeping_its_figures_and_the_next_part_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    args = gpu_suite.parse_args(["--out", str(tmp_path / "r.json"), "--budget-s", "120"])
    suite = StandinSuite(args, standin_parts(limit=60, limits={2: 6}))
    suite.sleeps = {"p1": 0, "p2": 120, "p3": 0}
    assert suite.run() == 1  # a timeout is not a success
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["statuses"] == {"p1": "ok", "p2": "timeout", "p3": "ok"}
    assert result["parts"][1]["seconds"] < 120  # killed, not slept through
    assert result["parts"][1]["figure"] == 2 and "done" not in result["parts"][1]
    assert json.loads((tmp_path / "out" / "gpu_suite.json").read_text())["statuses"] == result["statuses"]


def test_the_overall_budget_skips_parts_it_cannot_fit(tmp_path):
    args = gpu_suite.parse_args(["--out", str(tmp_path / "r.json"), "--budget-s", "8"])
    suite = StandinSuite(args, standin_parts(limit=60))
    suite.sleeps = {"p1": 60, "p2": 0, "p3": 0}
    suite.run()
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["statuses"]["p1"] == "timeout"
    assert result["statuses"]["p3"] == "skipped" and "budget" in result["parts"][2]["reason"]


def test_an_interrupted_run_writes_what_it_measured(tmp_path):
    import threading

    args = gpu_suite.parse_args(["--out", str(tmp_path / "r.json"), "--budget-s", "300"])
    suite = StandinSuite(args, standin_parts(limit=120))
    suite.sleeps = {"p1": 0, "p2": 120, "p3": 0}

    def p2_has_a_figure() -> bool:
        proc = suite.proc
        return "p1" in suite.parts and proc is not None and "figure" in Path(proc.args[3]).read_text()

    def interrupt_during_p2():  # SIGINT (Ctrl-C) once p2 has recorded a figure
        while not p2_has_a_figure():
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_during_p2, daemon=True).start()
    assert suite.run() == 130
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["interrupted"] is True
    assert result["statuses"] == {"p1": "ok", "p2": "interrupted", "p3": "not run"}
    assert result["parts"][0]["done"] and result["parts"][1]["figure"] == 2  # figures so far are kept
    assert signal.getsignal(signal.SIGINT) != suite._on_signal  # the handler is given back


def test_goals_take_figure_baseline_and_ratio_from_the_parts():
    parts = {
        "pretrain_mfu": {"best": {"glm_350m": {"tokens_per_s": 1.0, "mfu": 0.5, "compiled": True, "seq_len": 2048,
                                               "precision": "bf16"}}},
        "quant_kernels": {"kernels": {"w4a16": {"speedup_b1": 3.2, "speedup_b16": 2.0, "bandwidth_fraction_b1": 0.8}}},
        "serve_engine": {"levels": {"c1": {"tokens_per_s": 10.0}, "c32": {"tokens_per_s": 50.0}}, "ratio_c32_over_c1": 5.0},
        "batched_eval": {"items_per_s": 9.0, "baseline_items_per_s": 3.0, "ratio": 3.0},
    }
    got = {g["goal"]: g for g in gpu_suite.goals(parts)}
    assert got["MFU glm_350m (seq 2048, bf16, compiled)"]["met"] is True
    assert got["W4A16 speedup_b1 (worst layer)"]["met"] is True
    assert got["W4A16 speedup_b16 (worst layer)"]["met"] is False
    serve = got["serve tokens/s at concurrency 32 over 1"]
    assert (serve["value"], serve["baseline"], serve["ratio"], serve["met"]) == (50.0, 10.0, 5.0, False)
    assert got["batched multiple-choice eval over one item at a time"]["met"] is True


def test_synthetic_rows_follow_the_sample_schema():
    from glm.schema import COLUMNS

    special = gpu_suite._special(512)
    rows = gpu_suite.synthetic_rows(3, 32, 512, special, use_2d=True, seed=0)
    assert set(rows) == set(COLUMNS) and rows["input_ids"].shape == (3, 32)
    assert (rows["segment_ids"] == 1).all()  # one sample filling each row
    assert (rows["input_ids"][:, 15] == special.gmask).all() and (rows["input_ids"][:, 16] == special.sop).all()
    assert ((rows["labels"] != -100).sum(1) == 16).all()  # Part B (targets): the second half
    assert (rows["prefix_mask"][:, :16] == 1).all() and (rows["prefix_mask"][:, 16:] == 0).all()
