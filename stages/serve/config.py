"""The serve stage's typed config: what the replica loads, how it batches, how it is deployed.

The same dataclass is filled from `python -m stages.serve` flags, from a YAML given with
`--config`, and from the `args:` of an application in a Serve config file (`serve deploy`).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import asdict, dataclass
from typing import Any

API_KEY_ENV = "GLM_SERVE_API_KEY"


@dataclass
class ServeConfig:
    """One GLM endpoint."""

    checkpoint: str = ""
    """Inference checkpoint directory or URI (glm-inference-v1; FP or quantized)."""
    model_name: str = "glm"
    """The model id clients pass as `model` and that GET /v1/models lists."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds (loopback by default; 0.0.0.0 exposes it, which needs an
    API key or `allow_unauthenticated: true`)."""
    port: int = 8000
    """HTTP port of the proxy."""
    route_prefix: str = "/"
    """URL prefix of the application."""
    api_key: str = ""
    """When set, every route but /health and the web page requires `Authorization: Bearer
    <api_key>` (401 otherwise). Empty: $GLM_SERVE_API_KEY of the deploying process, if set."""
    allow_unauthenticated: bool = False
    """Say that an endpoint bound beyond loopback without an API key is meant to be open
    (otherwise deploying refuses)."""
    device: str = "auto"
    """'auto' (CUDA when the replica has a GPU, else CPU), 'cpu' or 'cuda'."""
    dtype: str = "auto"
    """'auto' (as stored in the checkpoint), 'float32', 'bfloat16' or 'float16'."""
    max_batch_size: int = 8
    """Most requests decoded together in one step (continuous batching)."""
    max_waiting: int = 64
    """Requests that may wait for a batch slot per replica; more get 429."""
    max_beam_requests: int = 2
    """Beam searches decoded at once per replica (each steps beside the batch); more wait."""
    max_request_bytes: int = 1_048_576
    """Largest request body; a larger one is answered 413 before it is read or parsed."""
    body_timeout_s: float = 30.0
    """A request body must arrive within this long (408 otherwise: a trickled upload frees its slot)."""
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
    """GPUs per replica; with tensor_parallel > 1, per tensor-parallel worker: 0 (CPU, gloo)
    or 1 (one GPU each, NCCL)."""
    tensor_parallel: int = 1
    """Tensor-parallel degree: > 1 splits the model over this many worker processes (Ray actors
    in the replica's STRICT_PACK placement group: one node), each holding 1/N of every layer
    (`glm.parallel`); the replica keeps the batching and sampling. Must divide the model's
    heads, FFN width and vocabulary (checked by `deploy` and by the replica)."""
    max_ongoing_requests: int = 128
    """Requests Serve sends to one replica at once; at least max_batch_size + max_waiting + 16.
    The replica answers 429 itself (an OpenAI error) from max_ongoing_requests - 8 requests in
    flight, so Serve's own queue (plain-text answers) does not fill."""
    max_queued_requests: int = 256
    """Requests Serve holds when every replica is full; more get Serve's own 429 (plain text:
    Ray Serve does not let an application shape that body)."""

    def __post_init__(self) -> None:
        checks = {
            "max_batch_size": self.max_batch_size >= 1,
            "max_waiting": self.max_waiting >= 0,
            "max_beam_requests": self.max_beam_requests >= 1,
            "max_request_bytes": self.max_request_bytes >= 1024,
            "body_timeout_s": self.body_timeout_s > 0,
            "max_ongoing_requests": self.max_ongoing_requests >= self.max_batch_size + self.max_waiting + 16,
            "max_queued_requests": self.max_queued_requests >= 1,
            "default_max_tokens": self.default_max_tokens >= 1,
            "default_temperature": self.default_temperature >= 0,
            "default_top_p": 0 < self.default_top_p <= 1,
            "request_timeout_s": self.request_timeout_s > 0,
            "num_replicas": self.num_replicas >= 1,
            "port": 0 < self.port < 65536,
            "device": self.device in ("auto", "cpu", "cuda"),
            "dtype": self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "route_prefix": self.route_prefix.startswith("/"),
            "tensor_parallel": self.tensor_parallel >= 1,
            "num_gpus": self.num_gpus >= 0 and (self.tensor_parallel == 1 or self.num_gpus in (0, 1)),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"ServeConfig: invalid value for {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}"
                             + (" (max_ongoing_requests must be at least max_batch_size + max_waiting + 16)"
                                if "max_ongoing_requests" in bad else "")
                             + (" (with tensor_parallel > 1, num_gpus is per worker: 0 for CPU workers or 1 GPU "
                                "each)" if "num_gpus" in bad and self.tensor_parallel > 1 else ""))

    def placement_bundles(self) -> list[dict[str, float]] | None:
        """The replica's placement group (None without tensor parallelism): its own bundle,
        then one per tensor-parallel worker (1 CPU and num_gpus each)."""
        if self.tensor_parallel == 1:
            return None
        worker = {"CPU": 1.0, **({"GPU": self.num_gpus} if self.num_gpus else {})}
        return [{"CPU": self.num_cpus}] + [dict(worker) for _ in range(self.tensor_parallel)]

    def resolved_api_key(self) -> str:
        """The API key: `api_key`, else $GLM_SERVE_API_KEY, else '' (open)."""
        return self.api_key or os.environ.get(API_KEY_ENV, "")

    def check_exposure(self) -> None:
        """Refuse an endpoint reachable beyond loopback with no API key, unless
        `allow_unauthenticated` says it is meant to be open (ValueError)."""
        if is_loopback(self.host) or self.resolved_api_key() or self.allow_unauthenticated:
            return
        raise ValueError(f"refusing to serve on {self.host!r} without an API key: anyone who can reach the port could "
                         f"use the model. Set api_key (or {API_KEY_ENV}), bind 127.0.0.1, or set "
                         f"allow_unauthenticated: true if the endpoint is meant to be open")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything
