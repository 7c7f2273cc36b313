"""lm-evaluation-harness (`lm_eval`) adapter: run its tasks on our inference checkpoints.

    python -m stages.eval.harness --checkpoint runs/smoke/sft/model --tasks lambada_openai --limit 100
    python -m stages.eval.harness --checkpoint DIR --tasks my_task --include-path my_tasks/

or from Python: `lm_eval.simple_evaluate(model=GLMHarnessLM("runs/smoke/sft/model"), tasks=[...])`.
Importing this module registers the model under the name `glm` (`model="glm",
model_args="checkpoint=DIR"`). Requests are scored in GLM's layout: the context is Part A with
[gMASK], the continuation or generation is the Part-B span after [sop]; requests that share a
context are scored together on one cached context (stages/eval/scoring.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from glm.generation import GenerationConfig
from stages.eval import scoring


@register_model("glm")
class GLMHarnessLM(LM):
    """lm_eval LM over a GLM inference checkpoint (FP or quantized)."""

    def __init__(self, checkpoint: str, device: str = "auto", batch_size: int | str = 16, **kwargs) -> None:
        super().__init__()
        from glm.checkpoint import load_inference_checkpoint
        from stages.eval.stage import resolve_device

        self.model, self.tokenizer = load_inference_checkpoint(checkpoint, device=resolve_device(device))
        self.special = self.tokenizer.special
        self.batch_size = int(batch_size)
        self.max_len = self.model.config.max_seq_len

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per request."""
        contexts: dict[str, list[int]] = {}  # context -> request indices, to share one cached context
        for i, req in enumerate(requests):
            contexts.setdefault(req.args[0], []).append(i)
        grouped = [(self.tokenizer.encode(ctx), [self._continuation(requests[i].args[1]) for i in idx])
                   for ctx, idx in contexts.items()]
        scores = scoring.score_continuations(self.model, self.special, grouped, mask_token=self.special.gmask,
                                             max_len=self.max_len, batch_size=self.batch_size)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for idx, per_context in zip(contexts.values(), scores):
            for i, s in zip(idx, per_context):
                out[i] = (s.logprob, s.greedy)
        return out

    def _continuation(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)[-(self.max_len - 2):]  # as lm_eval's HF model: keep the end

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string, in sliding [gMASK] windows of the model's length."""
        docs = [self.tokenizer.encode(req.args[0]) for req in requests]
        per_doc = scoring.window_nll(self.model, self.special, docs, max_len=self.max_len,
                                     stride=self.max_len // 2, batch_size=self.batch_size)
        return [-nll for nll, _ in per_doc]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation of the span after each context, cut at the first `until` string."""
        out = [""] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for key, idx in by_kwargs.items():
            kwargs = json.loads(key)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            config = GenerationConfig(max_new_tokens=int(kwargs.get("max_gen_toks", 256)))
            spans = scoring.generate_answers(
                self.model, self.special, [self.tokenizer.encode(requests[i].args[0]) for i in idx],
                mask_token=self.special.gmask, max_len=self.max_len, config=config,
                vocab_limit=len(self.tokenizer), batch_size=self.batch_size)
            for i, span in zip(idx, spans):
                text = self.tokenizer.decode(span)
                for stop in until:
                    text = text.split(stop)[0]
                out[i] = text
        return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.eval.harness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="inference checkpoint directory or URI")
    parser.add_argument("--tasks", nargs="+", required=True, help="lm_eval task names")
    parser.add_argument("--include-path", help="a folder of your own lm_eval task YAMLs")
    parser.add_argument("--limit", type=float, help="items per task (or a fraction)")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", help="write the results JSON here")
    args = parser.parse_args(argv)
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=GLMHarnessLM(args.checkpoint, device=args.device, batch_size=args.batch_size), tasks=args.tasks,
        num_fewshot=args.num_fewshot, limit=args.limit, task_manager=TaskManager(include_path=args.include_path))
    print(json.dumps(results["results"], indent=2, default=str))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({k: results[k] for k in ("results", "configs", "versions")}, f, indent=2, default=str, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
