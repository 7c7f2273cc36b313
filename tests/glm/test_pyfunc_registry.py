"""The inference checkpoint as an MLflow Model (glm/pyfunc.py) and checkpoints named by MLflow
URIs (glm/registry.py), with a real MLflow SQLite store and a tiny checkpoint."""

import pandas as pd
import pytest
import torch

from glm.config import preset
from glm.model import GLMModel


def test_conversation_takes_alternating_turns_ending_with_the_user():
    from glm.pyfunc import conversation

    assert conversation([{"role": "user", "content": "hi"}], "r") == ("hi", [])
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert conversation(msgs, "r") == ("c", [("a", "b")])
    with pytest.raises(ValueError, match=r"r: messages\[0\] has role 'system'"):
        conversation([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], "r")
    with pytest.raises(ValueError, match="the last message must be the user's"):
        conversation(msgs[:2], "r")
    with pytest.raises(ValueError, match="non-empty list"):
        conversation([], "r")


def test_requests_from_a_list_or_a_dataframe_and_unknown_fields_refused():
    from glm.pyfunc import _requests

    msgs = [{"role": "user", "content": "hi"}]
    df = pd.DataFrame({"messages": [msgs, msgs], "max_tokens": [4, None]})
    rows = _requests(df)
    assert rows[0]["max_tokens"] == 4 and "max_tokens" not in rows[1]  # an absent cell is no setting
    assert _requests({"messages": msgs}) == [{"messages": msgs}]
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n'\]"):
        _requests([{"messages": msgs, "n": 2}])
    with pytest.raises(ValueError, match="no `messages` column"):
        _requests(pd.DataFrame({"prompt": ["x"]}))


@pytest.fixture
def registered(tmp_path, tokenizer, monkeypatch):
    """A tiny checkpoint logged as an MLflow Model and registered twice (versions 1 and 2)."""
    import mlflow

    from glm.checkpoint import save_inference_checkpoint
    from glm.pyfunc import log_chat_model

    monkeypatch.setenv("GLM_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    from stages.tracking import use_experiment

    use_experiment(mlflow, "registry-test", uri)  # artifacts beside the database
    torch.manual_seed(0)
    ckpt = save_inference_checkpoint(GLMModel(preset("tiny", vocab_size=len(tokenizer))), tokenizer,
                                     str(tmp_path / "ckpt"))
    client = mlflow.MlflowClient()
    client.create_registered_model("tiny-chat")
    with mlflow.start_run() as run:
        info = log_chat_model(ckpt)
    for _ in range(2):
        client.create_model_version("tiny-chat", source=info.model_uri, run_id=run.info.run_id)
    client.set_registered_model_alias("tiny-chat", "newest", "1")
    yield tmp_path, ckpt, client, run.info.run_id
    mlflow.set_tracking_uri(None)


def test_models_and_runs_uris_open_the_checkpoint_and_are_downloaded_once(registered):
    from glm.checkpoint import load_inference_checkpoint, read_checkpoint_config
    from glm.registry import local_checkpoint

    tmp, ckpt, client, run_id = registered
    local = local_checkpoint("models:/tiny-chat@newest")
    assert local == str(tmp / "cache/tiny-chat/1/artifacts/ckpt")  # the artifact keeps the folder's name
    model, _ = load_inference_checkpoint("models:/tiny-chat@newest")
    original, _ = load_inference_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    (tmp / "cache/tiny-chat/1/marker").write_text("x")
    assert local_checkpoint("models:/tiny-chat/1") == local and (tmp / "cache/tiny-chat/1/marker").exists()  # cached
    client.set_registered_model_alias("tiny-chat", "newest", "2")  # the alias moved: the new version is fetched
    assert local_checkpoint("models:/tiny-chat@newest") == str(tmp / "cache/tiny-chat/2/artifacts/ckpt")
    assert read_checkpoint_config(f"runs:/{run_id}/model/artifacts/ckpt")[0].num_layers == 2  # a plain directory
    with pytest.raises(FileNotFoundError, match="models:/nope@newest: not found in the MLflow tracking server"):
        local_checkpoint("models:/nope@newest")


def test_the_logged_model_answers_chat_requests(registered):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/tiny-chat@newest")
    assert model.metadata.signature.inputs.input_names()[0] == "messages"
    msgs = [{"role": "user", "content": "你好"}]
    [answer] = model.predict([{"messages": msgs, "max_tokens": 3, "temperature": 0.5}])
    assert answer["role"] == "assistant" and isinstance(answer["content"], str)
    assert len(model.predict(pd.DataFrame({"messages": [msgs, msgs]}).assign(max_tokens=2))) == 2
