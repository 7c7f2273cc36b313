"""lm-evaluation-harness on our checkpoint with local task files (no network): its accuracy and
bits per byte equal the eval stage's own scores of the same items in the same layout."""

import json

import pytest

from eval_models import write_tiny_checkpoint


@pytest.fixture(scope="module")
def eval_checkpoint(tokenizer, tmp_path_factory):
    return write_tiny_checkpoint(tokenizer, tmp_path_factory.mktemp("eval") / "model")


ROWS = [{"question": f"Question {i}: which colour?", "choices": ["red", "green", "a blue one"], "label": i % 3,
         "text": f"It was the best of times, it was the worst of times, number {i}. 天下大势，分久必合。"}
        for i in range(5)]

TASKS = {
    "glm_local_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                    "doc_to_target: label\nmetric_list:\n  - metric: acc\n",
    "glm_local_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                     "metric_list:\n  - metric: bits_per_byte\n",
    "glm_local_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{choices[label]}}'\n"
                     "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\nmetric_list:\n  - metric: exact_match\n",
}


@pytest.mark.integration
def test_lm_eval_tasks_match_our_scoring(eval_checkpoint, tmp_path, monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from glm.checkpoint import load_inference_checkpoint
    from stages.eval.config import TaskConfig
    from stages.eval.harness import GLMHarnessLM
    from stages.eval.stage import evaluate_task

    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    for name, body in TASKS.items():
        (tmp_path / "tasks").mkdir(exist_ok=True)
        (tmp_path / "tasks" / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n{body}")
    lm = GLMHarnessLM(eval_checkpoint, batch_size=4)
    results = lm_eval.simple_evaluate(model=lm, tasks=sorted(TASKS),
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks")))["results"]

    model, tokenizer = load_inference_checkpoint(eval_checkpoint)
    glm_rows = tmp_path / "glm.jsonl"  # the same items in GLM-130B's shape; lm_eval puts a space before a choice
    glm_rows.write_text("".join(json.dumps({"inputs_pretokenized": r["question"], "label": r["label"], "text": r["text"],
                                            "choices_pretokenized": [" " + c for c in r["choices"]]}) + "\n" for r in ROWS))
    ours_mc = evaluate_task(model, tokenizer, TaskConfig(name="mc", type="multiple_choice", data=str(glm_rows), mask="[gMASK]"),
                            batch_size=4, log=lambda m: None)
    ours_lm = evaluate_task(model, tokenizer, TaskConfig(name="lm", type="language_modeling", data=str(glm_rows),
                                                          mask="[gMASK]", max_length=model.config.max_seq_len),
                            batch_size=4, log=lambda m: None)
    assert results["glm_local_mc"]["acc,none"] == pytest.approx(ours_mc["metrics"]["accuracy"])
    assert results["glm_local_ppl"]["bits_per_byte,none"] == pytest.approx(ours_lm["metrics"]["bits_per_byte"], rel=1e-5)
    assert 0.0 <= results["glm_local_gen"]["exact_match,none"] <= 1.0

    # request level: (log-prob, is_greedy) of each continuation equals our scorer's
    from lm_eval.api.instance import Instance

    from stages.eval.scoring import score_continuations

    pairs = [(r["question"], " " + c) for r in ROWS[:2] for c in r["choices"]] + [("", "Hello")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (ctx, cont), (logprob, greedy) in zip(pairs, got):
        [[score]] = score_continuations(model, tokenizer.special, [(tokenizer.encode(ctx), [tokenizer.encode(cont)])],
                                        mask_token=tokenizer.special.gmask, max_len=model.config.max_seq_len, batch_size=1)
        assert logprob == pytest.approx(score.logprob, abs=1e-4) and greedy == score.greedy
