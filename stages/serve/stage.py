"""Python API of the serve stage: `deploy(config) -> url` on a running Ray, and `shutdown()`.

    from stages.serve import ServeConfig, deploy, shutdown
    url = deploy(ServeConfig(checkpoint="runs/smoke/sft/model"))   # http://127.0.0.1:8000
    ...
    shutdown()
"""

from __future__ import annotations

import json
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


def deploy(config: ServeConfig, app_name: str = APP_NAME, timeout_s: float = 300.0) -> str:
    """Start the GLM application on the connected Ray (Serve's HTTP proxy on config.host:port);
    returns the base URL once /health answers. Call `ray.init` (or `stages.cluster.ensure_ray`)
    first. A local checkpoint path is made absolute, since replicas have their own working
    directory."""
    from ray import serve

    from stages.serve.app import build_app

    if not config.checkpoint:
        raise ValueError("ServeConfig.checkpoint is required: an inference checkpoint directory or URI")
    args = config.to_dict()
    if "://" not in config.checkpoint:
        path = Path(config.checkpoint).resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"not an inference checkpoint (no config.json): {path}")
        args["checkpoint"] = str(path)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(args), name=app_name, route_prefix=config.route_prefix)
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
