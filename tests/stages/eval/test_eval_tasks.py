"""Task YAMLs and data: recursive collection, errors that name the problem, adapters, few-shot."""

import json
from pathlib import Path

import pytest

from glm.config import ConfigError
from stages.eval.adapters import ADAPTERS
from stages.eval.tasks import REPO_ROOT, find_task_files, load_task_data, load_tasks, task_groups

SHARED_EVAL = REPO_ROOT.parent / "shared" / "data" / "eval"


def write_task(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


def test_shipped_tasks_are_found_recursively_and_yield_items():
    tasks = load_tasks(["stages/eval/tasks"])
    assert {t.name for t in tasks} == {"boolq", "lambada", "openbookqa", "cmrc2018", "xcopa", "mmlu_stem",
                                       "mmlu_humanities", "mmlu_social_sciences", "mmlu_other"}
    for task in tasks:
        data = load_task_data(task, max_items=3)
        assert len(data.items) == 3 and not data.skipped, task.name


@pytest.mark.parametrize("folder", ["stages/eval/tasks", "stages/eval/shared_tasks"])
def test_shipped_groups(folder):
    groups = task_groups(load_tasks([folder]))
    assert len(groups["mmlu"]) == 4 and "en" in groups and "zh" in groups


def test_group_named_like_a_task_is_refused(tmp_path):
    write_task(tmp_path / "a.yaml", "name: a\ntype: multiple_choice\ndata: x.jsonl\ngroups: [b]\n")
    write_task(tmp_path / "b.yaml", "name: b\ntype: multiple_choice\ndata: x.jsonl\n")
    with pytest.raises(ConfigError, match=r"group name\(s\) \['b'\] are also task names"):
        task_groups(load_tasks([str(tmp_path)]))


def test_mmlu_groups_cover_every_subject_once():
    tasks = [t for t in load_tasks(["stages/eval/tasks/en/mmlu"])]
    subjects = [s for t in tasks for s in t.where["subject"]]
    assert len(subjects) == len(set(subjects)) == 57
    assert sum(len(load_task_data(t).items) for t in tasks) == 570  # every row of the sample file
    assert all(t.groups == ["mmlu", "en"] for t in tasks)


@pytest.mark.skipif(not SHARED_EVAL.is_dir(), reason="needs the team's shared data folder")
def test_shared_tasks_read_the_native_fields():
    for task in load_tasks(["stages/eval/shared_tasks"]):
        data = load_task_data(task, max_items=20)
        assert len(data.items) == 20 and not data.skipped, task.name


def test_adapters_map_native_rows():
    mmlu = ADAPTERS["mmlu"]({"subject": "anatomy", "question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "C"})
    assert mmlu.label == 2 and mmlu.choices == ["A", "B", "C", "D"] and mmlu.inputs.endswith("D. d\nAnswer:")
    boolq = ADAPTERS["boolq"]({"question": "is it", "passage": "P", "label": True})
    assert boolq.choices[boolq.label] == "Yes"
    xcopa = ADAPTERS["xcopa"]({"premise": "甲。", "choice1": "乙", "choice2": "丙", "question": "cause", "label": 1})
    assert xcopa.inputs == "甲。原因是：" and xcopa.choices[xcopa.label] == "丙"
    tnews = ADAPTERS["tnews"]({"sentence": "s", "label": 110})
    assert tnews.choices[tnews.label] == "军事" and len(tnews.choices) == 15
    ocnli = ADAPTERS["ocnli"]({"premise": "p", "hypothesis": "h", "label": "contradiction"})
    assert ocnli.choices[ocnli.label] == "矛盾"
    glm = ADAPTERS["glm"]({"inputs_pretokenized": "x", "targets_pretokenized": "y"})
    assert glm.targets == ["y"]


def test_unknown_yaml_field_is_named(tmp_path):
    write_task(tmp_path / "t.yaml", "name: t\ntype: multiple_choice\ndata: x.jsonl\nmax_lenght: 10\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: unknown key\(s\) 'max_lenght'"):
        load_tasks([str(tmp_path)])


def test_bad_values_are_named(tmp_path):
    write_task(tmp_path / "a.yaml", "name: a\ntype: multiple_choice\ndata: x.jsonl\nmetrics: [f1]\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: .*metric\(s\) \['f1'\] not available for multiple_choice"):
        load_tasks([str(tmp_path / "a.yaml")])
    write_task(tmp_path / "b.yaml", "name: b\ntype: multiple_choice\ndata: x.jsonl\nformat: mmluu\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: format 'mmluu' is unknown"):
        load_tasks([str(tmp_path / "b.yaml")])
    write_task(tmp_path / "c.yaml", "name: c\ntype: ranking\ndata: x.jsonl\n")
    with pytest.raises(ConfigError, match=r"c\.yaml\.type: 'ranking' is not one of"):
        load_tasks([str(tmp_path / "c.yaml")])


def test_duplicate_task_names_are_refused(tmp_path):
    for sub in ("en", "zh"):
        write_task(tmp_path / sub / "t.yaml", "name: same\ntype: multiple_choice\ndata: x.jsonl\n")
    with pytest.raises(ConfigError, match="task name 'same' is also used by"):
        load_tasks([str(tmp_path)])


def test_missing_data_file_is_named(tmp_path):
    write_task(tmp_path / "t.yaml", "name: mytask\ntype: multiple_choice\ndata: data/sample/eval/nope.jsonl\n")
    [task] = load_tasks([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="task 'mytask': data file not found: data/sample/eval/nope.jsonl"):
        load_task_data(task)
    with pytest.raises(FileNotFoundError, match="task path not found: nowhere/"):
        find_task_files(["nowhere/"])


def test_bad_rows_are_counted_and_skipped(tmp_path):
    rows = ['{"inputs_pretokenized": "q", "choices_pretokenized": ["a", "b"], "label": 1}', "{not json",
            '{"inputs_pretokenized": "q", "choices_pretokenized": ["a", "b"], "label": 5}',
            '{"inputs_pretokenized": "q", "choices_pretokenized": ["a", "b"], "label": "x"}']
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    write_task(tmp_path / "t.yaml", f"name: t\ntype: multiple_choice\ndata: {tmp_path}\n")
    [task] = load_tasks([str(tmp_path / "t.yaml")])
    data = load_task_data(task)
    assert len(data.items) == 1
    assert data.skipped == {"bad_json": 1, "missing_fields": 1, "bad_row": 1}


def test_few_shot_examples_share_the_subject(tmp_path):
    def row(subject, q, answer):
        return json.dumps({"subject": subject, "question": q, "choices": ["1", "2"], "answer": answer})
    (tmp_path / "dev.jsonl").write_text("\n".join([row("a", "dev a1", "A"), row("b", "dev b1", "B"), row("a", "dev a2", "B")]))
    (tmp_path / "test.jsonl").write_text("\n".join([row("b", "test b", "A"), row("a", "test a", "A")]))
    write_task(tmp_path / "t.yaml", f"name: t\ntype: multiple_choice\ndata: {tmp_path}/test.jsonl\nformat: mmlu\n"
                                    f"few_shot: 2\nfew_shot_data: {tmp_path}/dev.jsonl\nfew_shot_match: subject\n")
    [task] = load_tasks([str(tmp_path / "t.yaml")])
    b, a = load_task_data(task).items
    assert "dev b1" in b.inputs and "dev a1" not in b.inputs and b.inputs.index("dev b1") < b.inputs.index("test b")
    assert a.inputs.index("dev a1") < a.inputs.index("dev a2") < a.inputs.index("test a")
    assert "dev a1\nA. 1\nB. 2\nAnswer: A\n\n" in a.inputs  # demonstration = prompt + space + answer


def test_report_path_placeholders_are_checked():
    from stages.eval.config import EvalConfig

    assert EvalConfig(checkpoint="c").output == "runs/eval/{run_name}-{time}.json"  # a report of its own per run
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \['run'\]"):
        EvalConfig(checkpoint="c", output="runs/{run}.json")
    with pytest.raises(ConfigError, match="expected '}'"):
        EvalConfig(checkpoint="c", output="runs/{time.json")
