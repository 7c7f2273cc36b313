"""Local smoke run: the real stages on the shipped sample data, on CPU, in a few minutes.

    python -m pipelines.smoke --config pipelines/configs/smoke.yaml      (or: make smoke)

data stage (Ray Data) -> pretraining (Ray Train x DeepSpeed, 2 workers) -> blank filling and
a chat turn with the exported inference checkpoint. The pipeline issue grows this into
data -> pretrain -> SFT -> RLHF -> quantize -> serve with one MLflow lineage.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from glm.config import load_yaml
from stages.data.config import DataConfig
from stages.pretrain.config import PretrainConfig
from stages.tracking import default_tracking_uri


@dataclass
class SmokeConfig:
    data: DataConfig
    """The data stage's config."""
    pretrain: PretrainConfig
    """The pretraining stage's config; its `data` is filled with the data stage's output."""
    prompts: list[str] = field(default_factory=lambda: ["First Citizen:\n", "话说天下大势，[MASK]"])
    """Texts for GLM blank filling with the trained model ([gMASK] appended when no mask)."""
    chat: str = "你好"
    """One chat turn in the ChatGLM format."""
    max_new_tokens: int = 32


def run(cfg: SmokeConfig) -> Path:
    from stages.data import run as run_data
    from stages.pretrain.stage import run as run_pretrain

    t0 = time.time()
    print("== data stage", flush=True)
    cfg.pretrain.data = run_data(cfg.data)
    print("== pretraining", flush=True)
    run_pretrain(cfg.pretrain)

    print("== generation with the trained model", flush=True)
    from glm.checkpoint import load_inference_checkpoint
    from glm.generation import GenerationConfig, chat, fill_blanks

    model, tokenizer = load_inference_checkpoint(cfg.pretrain.output)
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, no_repeat_ngram_size=3)
    for prompt, result in zip(cfg.prompts, fill_blanks(model, tokenizer, cfg.prompts, gen)):
        print(f"  fill {prompt!r} -> {result.text!r}")
    response, _ = chat(model, tokenizer, cfg.chat, config=gen)
    print(f"  chat {cfg.chat!r} -> {response!r}")
    print(f"done in {time.time() - t0:.0f}s; inference checkpoint: {cfg.pretrain.output}")
    if cfg.pretrain.tracking.enabled or cfg.data.tracking.enabled:
        uri = cfg.pretrain.tracking.tracking_uri or default_tracking_uri()
        print(f"MLflow: .venv/bin/mlflow ui --backend-store-uri {uri}")
    return Path(cfg.pretrain.output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="pipelines/configs/smoke.yaml", help="YAML file of SmokeConfig fields")
    args = parser.parse_args(argv)
    run(load_yaml(SmokeConfig, args.config))


if __name__ == "__main__":
    main()
