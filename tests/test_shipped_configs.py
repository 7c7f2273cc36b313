"""Every YAML config shipped in the repo loads into its typed config; unknown keys fail by name."""

from pathlib import Path

import pytest

from glm.config import ConfigError, load_yaml
from pipelines.smoke import SmokeConfig
from stages.data.config import DataConfig
from stages.pretrain.config import PretrainConfig
from stages.sft.config import SFTConfig
from stages.rlhf.config import RLHFConfig

REPO = Path(__file__).resolve().parent.parent

# Each shipped YAML and the dataclass it must load into. A new YAML must be registered here.
LOADERS = {
    "pipelines/configs/smoke.yaml": SmokeConfig,
    "stages/data/configs/sample.yaml": DataConfig,
    "stages/data/configs/shared.yaml": DataConfig,
    "stages/pretrain/configs/sample.yaml": PretrainConfig,
    "stages/sft/configs/sample.yaml": SFTConfig,
    "stages/rlhf/configs/reward.yaml": RLHFConfig,
    "stages/rlhf/configs/ppo.yaml": RLHFConfig,
    "stages/rlhf/configs/dpo.yaml": RLHFConfig,
}
NOT_CONFIGS = ("data/sample/", ".venv/", "runs/", "stages/data/templates/")  # templates: test_mip_templates.py  # third-party templates, environments, outputs


def shipped_yamls() -> list[str]:
    found = []
    for path in REPO.rglob("*.y*ml"):
        rel = path.relative_to(REPO).as_posix()
        if not rel.startswith(NOT_CONFIGS):
            found.append(rel)
    return sorted(found)


def test_every_yaml_is_registered():
    assert set(shipped_yamls()) == set(LOADERS), "register new YAML configs in LOADERS"


@pytest.mark.parametrize("rel", sorted(LOADERS))
def test_shipped_config_loads(rel):
    load_yaml(LOADERS[rel], REPO / rel)


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "pipelines/configs/smoke.yaml").read_text() + "\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key\\(s\\) 'learning_rate'"):
        load_yaml(SmokeConfig, bad)
    bad.write_text("output: x\nmodel:\n  preset: small\n  overides: {}\n")
    with pytest.raises(ConfigError, match="model: unknown key\\(s\\) 'overides'"):
        load_yaml(PretrainConfig, bad)
