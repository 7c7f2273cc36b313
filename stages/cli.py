"""What every stage CLI shares: loading its typed YAML config and running the stage, with errors a
user can act on instead of tracebacks."""

from __future__ import annotations

import sys
from typing import Any, Callable, TypeVar

from glm.config import ConfigError, load_yaml

T = TypeVar("T")


def load_config_or_exit(cls: type[T], path: str) -> T:
    """The config in `path`, or exit with status 2 and a message naming the file and key."""
    try:
        return load_yaml(cls, path)
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
