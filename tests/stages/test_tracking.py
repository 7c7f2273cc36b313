"""MLflow artifacts of the stages are readable UTF-8: Chinese as is, not \\u escapes."""

import json

from stages.tracking import json_text, stage_run


def test_json_artifacts_keep_chinese(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data = {"prompt": "你好", "answers": ["合久必分"], "n": 1}
    with stage_run(True, "utf8", {}, "utf8-test", uri) as run:
        run.log_dict(data, "report.json")
    client = mlflow.MlflowClient(tracking_uri=uri)
    raw = open(client.download_artifacts(run.run_id, "report.json", str(tmp_path)), "rb").read()
    assert "合久必分".encode("utf-8") in raw and b"\\u" not in raw and json.loads(raw) == data
    assert json_text(data) == json.dumps(data, indent=2, ensure_ascii=False)
