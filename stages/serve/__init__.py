"""The serve stage: the model behind an OpenAI-compatible Ray Serve endpoint (docs/serve.md).

    python -m stages.serve --checkpoint DIR         foreground, until Ctrl-C
    serve deploy stages/serve/configs/serve.yaml    on a running cluster
    deploy(ServeConfig(checkpoint=DIR)) -> url      from Python; shutdown() to stop

Importing this package is light: Ray, FastAPI and torch load when `deploy` runs.
"""

from stages.serve.config import ServeConfig
from stages.serve.stage import ReplicaStartError, deploy, newest_checkpoint, shutdown

__all__ = ["ReplicaStartError", "ServeConfig", "deploy", "newest_checkpoint", "shutdown"]
