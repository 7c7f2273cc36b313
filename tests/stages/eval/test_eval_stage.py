"""The eval stage end to end: run() in this process and as Ray tasks, MLflow, report, CLI."""

import json
import math
import re

import pytest

from stages.eval.__main__ import main
from stages.eval.config import EvalConfig
from stages.eval.stage import run
from stages.tracking import TrackingConfig

from eval_models import write_tiny_checkpoint


@pytest.fixture(scope="module")
def eval_checkpoint(tokenizer, tmp_path_factory):
    return write_tiny_checkpoint(tokenizer, tmp_path_factory.mktemp("eval") / "model")


MC = [{"inputs_pretokenized": f"Question {i}: which one?", "choices_pretokenized": ["red", "green", "a blue one"],
       "label": i % 3} for i in range(6)]
GEN = [{"inputs_pretokenized": "天下大势，分久必合", "targets_pretokenized": ["合久必分"]},
       {"inputs_pretokenized": "The capital of France is", "targets_pretokenized": ["Paris"]}]
LM = [{"text": "It was the best of times, it was the worst of times."}, {"text": "话说天下大势，分久必合，合久必分。"}]


@pytest.fixture
def task_dir(tmp_path):
    """Three tiny tasks (one per type) in nested folders, two of them in group `g`."""
    for name, rows, body in (
        ("mc", MC, "type: multiple_choice\ngroups: [g]\n"),
        ("gen", GEN, "type: generation\nnormalization: chinese\ngroups: [g]\ngeneration:\n  max_new_tokens: 4\n"),
        ("lm", LM, "type: language_modeling\nmask: \"[gMASK]\"\nstride: 8\nmax_length: 32\n"),
    ):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (tmp_path / "tasks" / name).mkdir(parents=True)
        (tmp_path / "tasks" / name / f"{name}.yaml").write_text(f"name: {name}\ndata: {tmp_path}/data/{name}.jsonl\n{body}")
    return tmp_path


def test_cli_scores_and_reports(eval_checkpoint, task_dir, capsys):
    out = task_dir / "report.json"
    assert main(["--checkpoint", eval_checkpoint, "--tasks", str(task_dir / "tasks"), "--output", str(out),
                 "--batch-size", "2", "--parallel", "local"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out}" in printed and f"table: {task_dir / 'report.md'}" in printed
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"mc", "gen", "lm"}
    assert report["groups"]["g"]["tasks"] == ["gen", "mc"] and report["groups"]["g"]["items"] == 8
    assert report["metrics"]["mc/items"] == 6 and 0 <= report["metrics"]["lm/bits_per_byte"]
    assert report["checkpoint_metadata"] == {"stage": "test"}
    # lm-eval's columns: version, n-shot, value ± standard error; and the baselines
    mc = report["tasks"]["mc"]
    assert (mc["version"], mc["n_shot"]) == (1, 0)
    p = mc["metrics"]["accuracy"]
    assert mc["stderr"]["accuracy"] == pytest.approx(math.sqrt(p * (1 - p) / 6))  # binomial
    assert mc["baselines"]["accuracy"] == {"chance": pytest.approx(1 / 3), "majority": pytest.approx(2 / 6)}
    assert report["tasks"]["gen"]["baselines"]["exact_match"] == {"majority": 0.5}  # two different answers
    assert report["tasks"]["lm"]["stderr"]["perplexity"] > 0  # bootstrap over the documents
    assert report["metrics"]["mc/accuracy_stderr"] == mc["stderr"]["accuracy"]
    table = (task_dir / "report.md").read_text(encoding="utf-8")
    assert table in printed
    row = re.search(r"^\|mc +\| +1\| +0\|accuracy +\|↑\|(.*)$", table, re.M)
    value, _, stderr, chance, majority, items = row.group(1).split("|")[:6]
    assert (float(value), float(stderr), float(chance), int(items)) == \
        (round(p, 4), round(mc["stderr"]["accuracy"], 4), 0.3333, 6)
    assert re.search(r"^\|Groups *\|Metric", table, re.M) and re.search(r"^\|g +\|accuracy", table, re.M)


def test_each_run_writes_its_own_report_and_the_samples_as_utf8(eval_checkpoint, task_dir, capsys):
    template = str(task_dir / "reports" / "{run_name}-{time}.json")
    argv = ["--checkpoint", eval_checkpoint, "--tasks", str(task_dir / "tasks"), "--output", template,
            "--parallel", "local", "--set", "log_samples=true", "--set", "bootstrap_iters=200"]
    assert main(argv) == 0 and main(argv) == 0  # within one second too
    reports = sorted((task_dir / "reports").glob("*.json"))
    assert len(reports) == 2 and all(r.name.startswith("eval-") for r in reports)
    first, second = (json.loads(r.read_text(encoding="utf-8")) for r in reports)
    assert first["report_uri"] != second["report_uri"] and first["metrics"] == second["metrics"]  # seeded bootstrap
    samples = [json.loads(line) for line in open(first["samples_uri"], encoding="utf-8")]
    assert len(samples) == 6 + 2 + 2 and {s["task"] for s in samples} == {"mc", "gen", "lm"}
    mc = [s for s in samples if s["task"] == "mc"]
    assert all(set(s) >= {"prompt", "target", "prediction", "score"} for s in mc)
    assert sum(s["score"]["accuracy"] for s in mc) / 6 == first["tasks"]["mc"]["metrics"]["accuracy"]
    assert next(s for s in samples if s["task"] == "gen")["target"] == ["合久必分"]
    # Chinese is written as is, readable in files and in the MLflow UI, not as \\u escapes
    for path in (reports[0], first["samples_uri"]):
        raw = open(path, "rb").read()
        assert "合久必分".encode("utf-8") in raw and b"\\u5408" not in raw
    assert "samples: " in capsys.readouterr().out


def test_cli_errors_name_the_task(eval_checkpoint, task_dir, capsys):
    (task_dir / "tasks" / "mc" / "mc.yaml").write_text("name: mc\ntype: multiple_choice\ndata: missing/file.jsonl\n")
    assert main(["--checkpoint", eval_checkpoint, "--tasks", str(task_dir / "tasks" / "mc"), "--parallel", "local"]) == 2
    assert "task 'mc': data file not found: missing/file.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--checkpoint" in capsys.readouterr().out


@pytest.mark.integration
def test_local_and_ray_runs_are_identical_and_logged_to_mlflow(eval_checkpoint, task_dir, ray_instance):
    import mlflow

    tracking = TrackingConfig(enabled=True, experiment="eval-test", tracking_uri=f"sqlite:///{task_dir}/mlflow.db")
    reports = []
    for i, parallel in enumerate(["local", "local", "ray"]):
        cfg = EvalConfig(checkpoint=eval_checkpoint, tasks=[str(task_dir / "tasks")], output=str(task_dir / f"r{i}.json"),
                         batch_size=4, parallel=parallel, tracking=tracking)
        reports.append(run(cfg))
    first, again, on_ray = reports
    # the same checkpoint and tasks give identical results twice
    assert again["metrics"] == first["metrics"]
    assert {k: {**v, "seconds": 0} for k, v in again["tasks"].items()} == \
           {k: {**v, "seconds": 0} for k, v in first["tasks"].items()}
    # on Ray (one torch thread per task) float sums may round differently in the last bits
    assert on_ray["metrics"] == pytest.approx(first["metrics"], rel=1e-6)
    assert json.loads((task_dir / "r2.json").read_text())["metrics"] == on_ray["metrics"]

    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri)
    logged = client.get_run(reports[2]["mlflow_run_id"])
    assert logged.data.metrics == pytest.approx(first["metrics"])
    assert {"mc/accuracy", "mc/accuracy_norm", "gen/exact_match", "gen/f1", "lm/perplexity", "g/accuracy", "g/f1"} <= set(logged.data.metrics)
    assert logged.data.tags["checkpoint"] == eval_checkpoint and logged.data.tags["stage"] == "eval"
    artifacts = [a.path for a in client.list_artifacts(logged.info.run_id)]
    assert "eval_report.json" in artifacts and "eval_report.md" in artifacts
    logged_report = open(client.download_artifacts(logged.info.run_id, "eval_report.json", str(task_dir)), "rb").read()
    assert "合久必分".encode("utf-8") in logged_report  # the generation examples, unescaped
