"""python -m stages.quantize --config FILE [--set KEY=VALUE ...] [--checkpoint URI] [--output URI] [--bits 4|8] [--group-size N] [--text FILE] [--max-ppl-increase X] [--track]

Quantizes a full-precision inference checkpoint to INT8 or INT4 weight-only (per output row
absmax with fp16 scales, or per group of input columns), converting it tensor by tensor.
The quality gate then measures perplexity on held-out text for the original, INT8 and INT4
models; the stage exits with status 1 and writes nothing when the output's perplexity rises
more than gate.max_ppl_increase. Results go to MLflow with --track (or tracking.enabled).

Example (see stages/quantize/configs/sample.yaml):
  python -m stages.quantize --config stages/quantize/configs/sample.yaml --bits 8
"""

import argparse
import sys

from stages.cli import add_set_argument, load_config_or_exit, run_stage
from stages.quantize.config import QuantizeConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file of QuantizeConfig fields")
    add_set_argument(parser)
    parser.add_argument("--checkpoint", help="override the full-precision checkpoint to quantize")
    parser.add_argument("--output", help="override where the quantized checkpoint goes")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="override bits")
    parser.add_argument("--group-size", type=int, help="override group_size (0 = one scale per row)")
    parser.add_argument("--text", help="override gate.text: held-out JSONL (`text` field) or plain text")
    parser.add_argument("--max-ppl-increase", type=float, help="override gate.max_ppl_increase (0.1 = +10%%)")
    parser.add_argument("--no-gate", action="store_true", help="skip the perplexity gate")
    parser.add_argument("--track", action="store_true", help="log to MLflow")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(QuantizeConfig, args.config, args.overrides)
    cfg.checkpoint = args.checkpoint or cfg.checkpoint
    cfg.output = args.output or cfg.output
    cfg.bits = args.bits or cfg.bits
    cfg.group_size = cfg.group_size if args.group_size is None else args.group_size
    cfg.gate.text = args.text or cfg.gate.text
    if args.max_ppl_increase is not None:
        cfg.gate.max_ppl_increase = args.max_ppl_increase
    cfg.gate.enabled = cfg.gate.enabled and not args.no_gate
    cfg.tracking.enabled = cfg.tracking.enabled or args.track
    from stages.quantize.stage import QualityGateError, run

    return run_stage(run, cfg, cfg.output, {QualityGateError: 1, FileNotFoundError: 2, ValueError: 2})


if __name__ == "__main__":
    sys.exit(main())
