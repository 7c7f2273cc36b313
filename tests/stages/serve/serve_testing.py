"""Shared by the serve integration tests: a tiny GLM checkpoint behind the real serve application.

A helper module, not a conftest.py (a second conftest would shadow the root one for
`from conftest import ...`); each test module wraps `serving` in a module-scoped fixture.
"""

import contextlib
import socket
from dataclasses import dataclass

import torch

API_KEY = "test-key"


@dataclass
class Server:
    url: str
    checkpoint: str
    api_key: str = API_KEY
    model: str = "glm-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(tokenizer, directory, chat_format: str | None = None):
    """Save a tiny GLM under `directory` (recording `chat_format` in its metadata when given;
    absent = ChatGLM-6B's), deploy it on the connected Ray (about 10 s), yield a Server, and
    shut Serve down afterwards so later tests find no application running."""
    from glm.checkpoint import save_inference_checkpoint
    from glm.config import padded_vocab_size, preset
    from glm.model import GLMModel
    from stages.serve import ServeConfig, deploy, shutdown

    torch.manual_seed(0)
    model = GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)))).eval()
    metadata = {"chat_format": chat_format} if chat_format else None
    checkpoint = save_inference_checkpoint(model, tokenizer, directory / "model", metadata=metadata)
    config = ServeConfig(checkpoint=str(checkpoint), model_name="glm-tiny", port=free_port(), api_key=API_KEY,
                         max_batch_size=4, max_waiting=8, default_max_tokens=32, request_timeout_s=120,
                         body_timeout_s=3)
    url = deploy(config, timeout_s=180)
    try:
        yield Server(url=url, checkpoint=str(checkpoint))
    finally:
        shutdown()
