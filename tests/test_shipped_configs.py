"""Every YAML config shipped in the repo loads into its typed config; unknown keys fail by name."""

from pathlib import Path

import pytest

from glm.config import ConfigError, load_yaml
from pipelines.full import load_config as load_pipeline
from stages.data.config import DataConfig
from stages.eval.config import EvalConfig, TaskConfig
from stages.pretrain.config import PretrainConfig
from stages.sft.config import SFTConfig
from stages.quantize.config import QuantizeConfig
from stages.rlhf.config import RLHFConfig

REPO = Path(__file__).resolve().parent.parent

# Each shipped YAML and the dataclass it must load into. A new YAML must be registered here.
LOADERS = {
    "pipelines/configs/smoke.yaml": load_pipeline,  # validates every stage section too
    "pipelines/configs/glm_1b.yaml": load_pipeline,
    "pipelines/configs/chatglm_6b.yaml": load_pipeline,
    "pipelines/configs/chatglm_6b_ptuning.yaml": load_pipeline,
    "pipelines/configs/glm_130b.yaml": load_pipeline,
    "stages/data/configs/sample.yaml": DataConfig,
    "stages/data/configs/shared.yaml": DataConfig,
    "stages/pretrain/configs/sample.yaml": PretrainConfig,
    "stages/sft/configs/sample.yaml": SFTConfig,
    "stages/quantize/configs/sample.yaml": QuantizeConfig,
    "stages/eval/configs/sample.yaml": EvalConfig,
    "stages/eval/shared_tasks/en/agnews.yaml": TaskConfig,
    "stages/eval/shared_tasks/en/boolq.yaml": TaskConfig,
    "stages/eval/shared_tasks/en/lambada.yaml": TaskConfig,
    "stages/eval/shared_tasks/en/mmlu/mmlu_humanities.yaml": TaskConfig,
    "stages/eval/shared_tasks/en/mmlu/mmlu_other.yaml": TaskConfig,
    "stages/eval/shared_tasks/en/mmlu/mmlu_social_sciences.yaml": TaskConfig,
    "stages/eval/shared_tasks/en/mmlu/mmlu_stem.yaml": TaskConfig,
    "stages/eval/shared_tasks/en/openbookqa.yaml": TaskConfig,
    "stages/eval/shared_tasks/en/rte.yaml": TaskConfig,
    "stages/eval/shared_tasks/en/sst2.yaml": TaskConfig,
    "stages/eval/shared_tasks/zh/cmmlu.yaml": TaskConfig,
    "stages/eval/shared_tasks/zh/cmrc2018.yaml": TaskConfig,
    "stages/eval/shared_tasks/zh/eprstmt.yaml": TaskConfig,
    "stages/eval/shared_tasks/zh/ocnli.yaml": TaskConfig,
    "stages/eval/shared_tasks/zh/tnews.yaml": TaskConfig,
    "stages/eval/shared_tasks/zh/xcopa.yaml": TaskConfig,
    "stages/eval/tasks/en/boolq.yaml": TaskConfig,
    "stages/eval/tasks/en/lambada.yaml": TaskConfig,
    "stages/eval/tasks/en/mmlu/mmlu_humanities.yaml": TaskConfig,
    "stages/eval/tasks/en/mmlu/mmlu_other.yaml": TaskConfig,
    "stages/eval/tasks/en/mmlu/mmlu_social_sciences.yaml": TaskConfig,
    "stages/eval/tasks/en/mmlu/mmlu_stem.yaml": TaskConfig,
    "stages/eval/tasks/en/openbookqa.yaml": TaskConfig,
    "stages/eval/tasks/zh/cmrc2018.yaml": TaskConfig,
    "stages/eval/tasks/zh/xcopa.yaml": TaskConfig,
    "stages/rlhf/configs/reward.yaml": RLHFConfig,
    "stages/rlhf/configs/ppo.yaml": RLHFConfig,
    "stages/rlhf/configs/grpo.yaml": RLHFConfig,
    "stages/rlhf/configs/dpo.yaml": RLHFConfig,
}
# not our dataclass configs: sample data, third-party templates (test_mip_templates.py), environments,
# outputs (runs/, MLflow artifacts in mlruns/), Ray Serve's own schema (test_serve_config_file.py), cluster manifests (test_infra_manifests.py)
NOT_CONFIGS = ("data/sample/", ".venv/", "runs/", "mlruns/", ".ray-cluster/", "stages/data/templates/", "stages/serve/configs/serve.yaml", "infra/")


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
    loader = LOADERS[rel]
    if isinstance(loader, type):
        load_yaml(loader, REPO / rel)
    else:
        loader(REPO / rel)


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "pipelines/configs/smoke.yaml").read_text() + "\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key\\(s\\) 'learning_rate'"):
        load_pipeline(bad)
    bad.write_text((REPO / "pipelines/configs/smoke.yaml").read_text().replace("validate_at_start", "validate_at_begin"))
    with pytest.raises(ConfigError, match="bad.yaml: sft.engine: unknown key\\(s\\) 'validate_at_begin'"):
        load_pipeline(bad)
    bad.write_text("output: x\nmodel:\n  preset: small\n  overides: {}\n")
    with pytest.raises(ConfigError, match="model: unknown key\\(s\\) 'overides'"):
        load_yaml(PretrainConfig, bad)
