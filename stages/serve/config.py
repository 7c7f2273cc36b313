"""The serve stage's typed config: what the replica loads, how it batches, how it is deployed.

The same dataclass is filled from `python -m stages.serve` flags, from a YAML given with
`--config`, and from the `args:` of an application in a Serve config file (`serve deploy`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ServeConfig:
    """One GLM endpoint."""

    checkpoint: str = ""
    """Inference checkpoint directory or URI (glm-inference-v1; FP or quantized)."""
    model_name: str = "glm"
    """The model id clients pass as `model` and that GET /v1/models lists."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds (loopback by default; 0.0.0.0 exposes it)."""
    port: int = 8000
    """HTTP port of the proxy."""
    route_prefix: str = "/"
    """URL prefix of the application."""
    api_key: str = ""
    """When set, /v1 routes require `Authorization: Bearer <api_key>` (401 otherwise)."""
    device: str = "auto"
    """'auto' (CUDA when the replica has a GPU, else CPU), 'cpu' or 'cuda'."""
    dtype: str = "auto"
    """'auto' (as stored in the checkpoint), 'float32', 'bfloat16' or 'float16'."""
    max_batch_size: int = 8
    """Most requests decoded together in one step (continuous batching)."""
    max_waiting: int = 64
    """Requests that may wait for a batch slot per replica; more get 429."""
    default_max_tokens: int = 256
    """max_tokens when a request gives none (capped by the room left in the context window)."""
    default_temperature: float = 0.95
    """temperature when a request gives none (ChatGLM's default); 0 means greedy."""
    default_top_p: float = 0.7
    """top_p when a request gives none (ChatGLM's default)."""
    request_timeout_s: float = 300.0
    """A generation still running after this long is cancelled and answered 503."""
    num_replicas: int = 1
    """Replicas of the model deployment (a Serve config file can autoscale instead)."""
    num_cpus: float = 1.0
    """CPUs reserved per replica; Ray sets torch's thread count from it."""
    num_gpus: float = 0.0
    """GPUs per replica."""
    max_ongoing_requests: int = 128
    """Requests Serve sends to one replica at once (above max_batch_size + max_waiting means 429s)."""
    max_queued_requests: int = 256
    """Requests Serve holds when every replica is full; more get 503."""

    def __post_init__(self) -> None:
        checks = {
            "max_batch_size": self.max_batch_size >= 1,
            "max_waiting": self.max_waiting >= 0,
            "default_max_tokens": self.default_max_tokens >= 1,
            "default_temperature": self.default_temperature >= 0,
            "default_top_p": 0 < self.default_top_p <= 1,
            "request_timeout_s": self.request_timeout_s > 0,
            "num_replicas": self.num_replicas >= 1,
            "port": 0 < self.port < 65536,
            "device": self.device in ("auto", "cpu", "cuda"),
            "dtype": self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "route_prefix": self.route_prefix.startswith("/"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"ServeConfig: invalid value for {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
