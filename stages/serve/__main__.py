"""python -m stages.serve [--config FILE] [--set KEY=VALUE ...] [--checkpoint DIR] [--port 8000] [--api-key KEY] [...]

Serves an inference checkpoint (default: the newest under ./runs) with the OpenAI-compatible
API, GLM blank filling and a web chat page, in the foreground until Ctrl-C. Starts a local Ray
instance unless --address names a cluster. Binds 127.0.0.1 unless --host says otherwise; with
an API key (--api-key or GLM_SERVE_API_KEY) every route but /health and the web page needs
`Authorization: Bearer KEY`. Binding beyond loopback without a key refuses to start unless
--allow-unauthenticated says the endpoint is meant to be open. Exit status 2 when the config,
the checkpoint or the replica's start-up fails (the replica's own error is printed).
Flags override the fields of --config (a YAML of ServeConfig fields) and of --set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import urllib.request
from pathlib import Path

from glm.registry import is_mlflow_uri, local_checkpoint
from stages.cli import add_set_argument, load_config_or_exit
from stages.serve.config import ServeConfig
from stages.tracking import stage_run

FLAGS = {  # flag -> (ServeConfig field, type, help)
    "--checkpoint": ("checkpoint", str, "inference checkpoint directory or URI, or an MLflow model (models:/glm-chat@newest, runs:/...) (default: newest under ./runs)"),
    "--host": ("host", str, "address to bind (default 127.0.0.1; 0.0.0.0 exposes the server)"),
    "--port": ("port", int, "HTTP port (default 8000)"),
    "--model-name": ("model_name", str, "model id for clients (default 'glm')"),
    "--max-batch-size": ("max_batch_size", int, "requests decoded together (default 8)"),
    "--max-waiting": ("max_waiting", int, "requests waiting per replica before 429 (default 64)"),
    "--num-replicas": ("num_replicas", int, "model replicas (default 1)"),
    "--num-cpus": ("num_cpus", float, "CPUs per replica; sets torch threads (default 1)"),
    "--num-gpus": ("num_gpus", float, "GPUs per replica, per worker with --tensor-parallel > 1 (default 0)"),
    "--tensor-parallel": ("tensor_parallel", int, "split the model over this many worker processes (default 1)"),
    "--device": ("device", str, "auto | cpu | cuda (default auto)"),
    "--dtype": ("dtype", str, "auto | float32 | bfloat16 | float16 (default auto: as stored)"),
}


def served_tokens(url: str) -> dict[str, float]:
    """Tokens the (first answering) replica generated, from /health; empty if it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return {"tokens_generated": json.load(r)["tokens_generated"]}
    except (OSError, ValueError, KeyError):
        return {}


def examples(url: str, model: str, api_key: str) -> str:
    auth = ' -H "Authorization: Bearer $GLM_SERVE_API_KEY"' if api_key else ""
    key = "os.environ['GLM_SERVE_API_KEY']" if api_key else "'none'"
    return (
        f"  web chat:  {url}/\n"
        f"  API:       {url}/v1   (docs: {url}/docs)\n"
        f"  terminal:  python -m stages.serve.chat --url {url}\n"
        f"  curl:      curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"               -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"你好\"}}]}}'\n"
        f"  openai:    OpenAI(base_url='{url}/v1', api_key={key}).chat.completions.create(\n"
        f"               model='{model}', messages=[{{'role': 'user', 'content': '你好'}}], stream=True)"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of ServeConfig fields (flags override it)")
    add_set_argument(parser)
    for flag, (_, tp, text) in FLAGS.items():
        parser.add_argument(flag, type=tp, help=text)
    parser.add_argument("--api-key", default=os.environ.get("GLM_SERVE_API_KEY"),
                        help="require this Bearer key on /v1 routes (default: $GLM_SERVE_API_KEY; none: open)")
    parser.add_argument("--allow-unauthenticated", action="store_true", default=None,
                        help="serve beyond loopback without an API key on purpose (refused otherwise)")
    parser.add_argument("--max-request-bytes", type=int, help="largest request body; larger get 413 (default 1 MiB)")
    parser.add_argument("--address", help="Ray cluster to join (default: start a local Ray instance)")
    parser.add_argument("--track", action="store_true",
                        help="log the config and endpoint to MLflow (a 'serve' run, ended at shutdown)")
    args = parser.parse_args(argv)
    config = load_config_or_exit(ServeConfig, args.config, args.overrides)
    for flag, (name, _, _) in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            setattr(config, name, value)
    config.api_key = args.api_key or config.api_key
    if args.allow_unauthenticated:
        config.allow_unauthenticated = True
    if args.max_request_bytes is not None:
        config.max_request_bytes = args.max_request_bytes
    try:
        config = ServeConfig(**config.to_dict())  # validate the merged values
        config.check_exposure()
        if not config.checkpoint:
            from stages.serve.stage import newest_checkpoint

            config.checkpoint = str(newest_checkpoint())
            print(f"serving the newest checkpoint: {config.checkpoint}", flush=True)
        if is_mlflow_uri(config.checkpoint):  # from the MLflow registry: downloaded once, then local
            config.checkpoint = local_checkpoint(config.checkpoint)
            print(f"serving {config.checkpoint}", flush=True)
        if "://" not in config.checkpoint:  # a missing or truncated local checkpoint: say so before starting Ray
            from glm.checkpoint import check_checkpoint_files

            if not (Path(config.checkpoint) / "config.json").is_file():
                raise FileNotFoundError(f"not an inference checkpoint (no config.json): {config.checkpoint}")
            check_checkpoint_files(config.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray

    from stages.cluster import ensure_ray
    from stages.serve.stage import ReplicaStartError, deploy, shutdown

    if args.address:
        ray.init(address=args.address)
    else:
        ensure_ray(min_cpus=math.ceil(config.num_replicas * config.num_cpus))
    print(f"starting the GLM endpoint ({config.num_replicas} replica(s)) ...", flush=True)
    params = {**config.to_dict(), "api_key": "set" if config.api_key else ""}
    with stage_run(args.track, "serve", params) as run:
        try:
            url = deploy(config)
        except (FileNotFoundError, ValueError, TimeoutError, ReplicaStartError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        run.set_tags({"endpoint": url})
        print(f"serving {config.checkpoint} as model '{config.model_name}' at {url}\n"
              f"{examples(url, config.model_name, config.api_key)}\n"
              f"Ctrl-C stops it.", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        print("shutting down ...", flush=True)
        run.log_metrics(served_tokens(url))
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
