"""What every stage CLI shares: loading its typed YAML config (with `--set path.to.key=value`
overrides) and running the stage, with errors a user can act on instead of tracebacks."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence, TypeVar

from glm.config import ConfigError, build_with_overrides, from_dict, load_yaml

T = TypeVar("T")

SET_HELP = ("set a config key, as if the YAML said so: path.to.key=value, the value read as YAML "
            "(e.g. --set engine.optim.lr=1e-3, --set 'tasks=[a.yaml, b.yaml]', --set sources[0].uri=...); "
            "repeatable, applied in order before the strict config check; flags win over it")


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable) on a CLI; the values land in `args.overrides`."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def load_config_or_exit(cls: type[T], path: str | None, overrides: Sequence[str] = (),
                        start: dict[str, Any] | None = None) -> T:
    """The config in `path` with the `--set` overrides, or exit with status 2 and a message
    naming the file and key (and the `--set` it came from). Without a file the overrides apply
    to `start` (default: no keys, the dataclass defaults)."""
    try:
        if path:
            return load_yaml(cls, path, overrides)
        return build_with_overrides(lambda data: from_dict(cls, data), start or {}, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run_stage(run: Callable[[T], Any], cfg: T, output: str,
              exit_codes: dict[type[BaseException], int] | None = None) -> int:
    """Run a stage from its CLI: an error of a kind in `exit_codes` (default: a missing input
    or a bad value, 2) prints as `error: ...` and returns its code; success prints the output."""
    exit_codes = exit_codes or {FileNotFoundError: 2, ValueError: 2}
    try:
        run(cfg)
    except tuple(exit_codes) as e:
        print(f"error: {e}", file=sys.stderr)
        return next(code for kind, code in exit_codes.items() if isinstance(e, kind))
    print(f"output: {output}")
    return 0
