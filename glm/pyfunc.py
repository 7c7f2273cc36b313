"""The inference checkpoint as an MLflow Model (the `python_function` flavour).

The pipeline logs its final model with `log_chat_model`: the checkpoint's files become the
model's artifacts (so a registry entry is portable to another machine) and this package
(`glm/`) its code, so nothing of the repo is needed where it is loaded:

    model = mlflow.pyfunc.load_model("models:/glm-chat@newest")
    model.predict([{"messages": [{"role": "user", "content": "你好"}]}])
    # -> [{"role": "assistant", "content": "...", "finish_reason": "stop"}]

Input: a list of OpenAI-style chat requests (dicts with `messages`, optionally `max_tokens`,
`temperature`, `top_p`), or a DataFrame with a `messages` column (and those columns
optionally). A conversation alternates user and assistant turns and ends with a user turn
(ChatGLM-6B's format has no system role). `mlflow models serve -m models:/glm-chat@newest
--env-manager local` answers the same on `/invocations`.

Imports mlflow (the flavour needs it); nothing else of glm/ does.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

# The signature is given explicitly (`signature()`): MLflow's hints about type-hinted predict
# methods and input examples (which would load the model at logging time) do not apply.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method.*")

CHECKPOINT_ARTIFACT = "checkpoint"
"""Name of the checkpoint directory among the model's artifacts (`<model>/artifacts/checkpoint`)."""

REQUEST_FIELDS = ("messages", "max_tokens", "temperature", "top_p")


def conversation(messages: Any, where: str) -> tuple[str, list[tuple[str, str]]]:
    """(query, history) of a chat request's messages; ValueError naming the request otherwise."""
    if hasattr(messages, "tolist"):  # a numpy array of dicts (a DataFrame cell)
        messages = messages.tolist()
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] must be an object with a string `content`")
        expected = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != expected:
            raise ValueError(f"{where}: messages[{i}] has role {m.get('role')!r}; this model takes alternating "
                             f"user and assistant turns starting with user (expected {expected!r})")
        turns.append(m["content"])
    if len(turns) % 2 == 0:
        raise ValueError(f"{where}: the last message must be the user's")
    return turns[-1], list(zip(turns[0:-1:2], turns[1:-1:2]))


def _requests(model_input: Any) -> list[dict[str, Any]]:
    """The chat requests of a predict() input: a list of dicts, one dict, or a DataFrame."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # pandas DataFrame
        if "messages" not in model_input.columns:
            raise ValueError(f"input DataFrame has no `messages` column (columns: {list(model_input.columns)})")
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, list):
        rows = model_input
    else:
        raise ValueError(f"input must be a list of chat requests or a DataFrame, not {type(model_input).__name__}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"request {i}: expected an object with `messages`, got {type(row).__name__}")
        unknown = set(row) - set(REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"request {i}: unknown field(s) {sorted(unknown)}; known: {list(REQUEST_FIELDS)}")
        # DataFrame cells of absent optional columns come back as None / NaN
        out.append({k: v for k, v in row.items() if not (v is None or (isinstance(v, float) and math.isnan(v)))})
    return out


class GLMChatModel(mlflow.pyfunc.PythonModel):
    """Chat with an inference checkpoint (full precision or quantized) on CPU or the local GPU."""

    def load_context(self, context) -> None:
        import torch

        from glm.chat_format import from_metadata
        from glm.checkpoint import load_inference_checkpoint, read_checkpoint_config

        device = "cuda" if torch.cuda.is_available() else "cpu"
        checkpoint = context.artifacts[CHECKPOINT_ARTIFACT]
        self.model, self.tokenizer = load_inference_checkpoint(checkpoint, device=device)
        self.chat_format = from_metadata(read_checkpoint_config(checkpoint)[1], self.tokenizer)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[dict[str, str]]:
        from glm.generation import chat, chat_generation_config

        answers = []
        for i, request in enumerate(_requests(model_input)):
            query, history = conversation(request.get("messages"), f"request {i}")
            overrides = {k: float(request[k]) for k in ("temperature", "top_p") if k in request}
            config = chat_generation_config(int(request.get("max_tokens", 128)), **overrides)
            response, _ = chat(self.model, self.tokenizer, query, history, config, self.chat_format)
            answers.append({"role": "assistant", "content": response})
        return answers


def signature():
    """Input: chat requests (messages as role/content objects, optional generation settings);
    output: one assistant message per request."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Object, Property, Schema

    message = Object([Property("role", DataType.string), Property("content", DataType.string)])
    inputs = Schema([ColSpec(Array(message), "messages"), ColSpec(DataType.long, "max_tokens", required=False),
                     ColSpec(DataType.double, "temperature", required=False),
                     ColSpec(DataType.double, "top_p", required=False)])
    return ModelSignature(inputs, Schema([ColSpec(DataType.string, "role"), ColSpec(DataType.string, "content")]))


def log_chat_model(checkpoint_dir: str | Path, name: str = "model", **kwargs):
    """Log the checkpoint at `checkpoint_dir` (a local directory or URI mlflow can download) as
    an MLflow Model in the active run; returns mlflow's ModelInfo."""
    package = Path(__file__).resolve().parent
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*input example was not provided.*")
        return mlflow.pyfunc.log_model(
            name=name, python_model=GLMChatModel(), artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_dir)},
            code_paths=[str(package)], signature=signature(), pip_requirements=_requirements(), **kwargs)


def _requirements() -> list[str]:
    """The packages loading the model needs, pinned to this environment's versions."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "sentencepiece", "safetensors", "numpy", "mlflow"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pass
    return pins
