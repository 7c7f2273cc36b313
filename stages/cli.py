"""What every stage CLI shares: loading its typed YAML config with errors a user can act on."""

from __future__ import annotations

import sys
from typing import TypeVar

from glm.config import ConfigError, load_yaml

T = TypeVar("T")


def load_config_or_exit(cls: type[T], path: str) -> T:
    """The config in `path`, or exit with status 2 and a message naming the file and key."""
    try:
        return load_yaml(cls, path)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
