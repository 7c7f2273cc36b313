"""Python API of the serve stage: `deploy(config) -> url` on a running Ray, and `shutdown()`.

    from stages.serve import ServeConfig, deploy, shutdown
    url = deploy(ServeConfig(checkpoint="runs/smoke/sft/model"))   # http://127.0.0.1:8000
    ...
    shutdown()
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from stages.serve.config import ServeConfig

APP_NAME = "glm"


def _wait_healthy(url: str, timeout_s: float) -> None:
    """Poll GET /health until the proxy routes to a ready replica."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200 and json.load(r).get("status") == "ok":
                    return
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"the GLM endpoint at {url} did not become healthy within {timeout_s:.0f}s (last: {last})")


class ReplicaStartError(RuntimeError):
    """The replica could not start (its constructor failed): the message is the replica's own error."""


def replica_error(app_name: str = APP_NAME) -> str:
    """The last line of the exception a failed replica raised (e.g. a checkpoint file that did
    not load), from Serve's status; '' when Serve reports none."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - status itself unavailable
        return ""
    if app is None:
        return ""
    messages = [d.message for d in app.deployments.values() if d.message] + [app.message or ""]
    for message in messages:
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        # a traceback ends with 'SomeError: message'; prefer our own errors' lines over Ray's wrappers
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
        if errors:
            return errors[-1]
    return next((m.strip() for m in messages if m.strip()), "")


def deploy(config: ServeConfig, app_name: str = APP_NAME, timeout_s: float = 300.0) -> str:
    """Start the GLM application on the connected Ray (Serve's HTTP proxy on config.host:port);
    returns the base URL once /health answers. Call `ray.init` (or `stages.cluster.ensure_ray`)
    first. A local checkpoint path is made absolute, since replicas have their own working
    directory.

    Raises ValueError for a config that exposes the endpoint without an API key (see
    `ServeConfig.check_exposure`), FileNotFoundError / ValueError for a local checkpoint that is
    missing or incomplete (or that `tensor_parallel` workers cannot share), and
    ReplicaStartError (with the replica's own error) when the replica fails to start."""
    from ray import serve

    from glm.checkpoint import check_checkpoint_files
    from stages.serve.app import build_app

    if not config.checkpoint:
        raise ValueError("ServeConfig.checkpoint is required: an inference checkpoint directory or URI")
    config.check_exposure()
    args = {**config.to_dict(), "api_key": config.resolved_api_key()}
    if "://" not in config.checkpoint:
        path = Path(config.checkpoint).resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"not an inference checkpoint (no config.json): {path}")
        check_checkpoint_files(path)  # cheap: files present with their recorded sizes (the replica verifies sums)
        if config.tensor_parallel > 1:  # refused here, not by a replica that fails to start
            from glm.checkpoint import read_checkpoint_config, read_checkpoint_quantization
            from stages.serve.tensor_parallel import check_shardable

            check_shardable(read_checkpoint_config(path)[0], read_checkpoint_quantization(path), config.tensor_parallel,
                            str(path))
        args["checkpoint"] = str(path)
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(build_app(args), name=app_name, route_prefix=config.route_prefix)
    except RuntimeError as e:
        cause = replica_error(app_name) or str(e)
        try:
            serve.delete(app_name)
        except Exception:  # noqa: BLE001 - best effort: the app failed anyway
            pass
        raise ReplicaStartError(f"the GLM replica failed to start: {cause}") from None
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    url = f"http://{host}:{config.port}{config.route_prefix.rstrip('/')}"
    _wait_healthy(url, timeout_s)
    return url


def shutdown(app_name: str = APP_NAME) -> None:
    """Delete the GLM application; shut Serve (and its HTTP proxy) down when no other
    application is left, so the port is free again."""
    from ray import serve

    serve.delete(app_name)
    if not serve.status().applications:
        serve.shutdown()


def newest_checkpoint(root: str | Path = "runs") -> Path:
    """The most recently written inference checkpoint (config.json with format glm-inference-v1)
    under `root`; what `make serve` serves."""
    from glm.checkpoint import FORMAT

    found = []
    for cfg in Path(root).rglob("config.json"):
        if cfg.parent.name.endswith(".partial"):
            continue  # a checkpoint still being written (glm.checkpoint renames it when complete)
        try:
            if json.loads(cfg.read_text()).get("format") == FORMAT:
                found.append(cfg.parent)
        except (OSError, ValueError):
            continue
    if not found:
        raise FileNotFoundError(f"no inference checkpoint (config.json with format {FORMAT!r}) under {root}/; "
                                f"run `make smoke` or pass --checkpoint")
    return max(found, key=lambda d: max(p.stat().st_mtime for p in d.iterdir()))
