"""Data stage: Ray Data corpus pipeline with GLM blank infilling and MIP (`python -m stages.data`)."""

from stages.data.config import DataConfig

__all__ = ["DataConfig", "run"]


def run(config: DataConfig) -> str:
    from stages.data.stage import run as _run

    return _run(config)
