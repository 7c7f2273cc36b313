"""`--set path.to.key=value` on every stage CLI and the pipeline: shown in --help, applied before
the strict config check, and a bad one exits with status 2 naming the flag and the key."""

import importlib
import subprocess
import sys

import pytest

from conftest import REPO

CLIS = ["stages.data", "stages.pretrain", "stages.sft", "stages.rlhf", "stages.quantize", "stages.eval",
        "stages.serve", "pipelines.full"]


@pytest.mark.parametrize("module", CLIS)
def test_help_shows_set(module, capsys):
    main = importlib.import_module(f"{module}.__main__" if module.startswith("stages.") else module).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--set KEY=VALUE" in out and "repeatable" in out


def test_set_reaches_the_typed_config():
    from stages.cli import load_config_or_exit
    from stages.pretrain.config import PretrainConfig
    from stages.serve.config import ServeConfig

    cfg = load_config_or_exit(PretrainConfig, str(REPO / "stages/pretrain/configs/sample.yaml"),
                              ["engine.optim.lr=1e-3", "model.overrides={num_layers: 2}", "engine.train_steps=7"])
    assert (cfg.engine.optim.lr, cfg.model.build().num_layers, cfg.engine.train_steps) == (1e-3, 2, 7)
    assert load_config_or_exit(ServeConfig, None, ["port=9000", "model_name=我的模型"]).port == 9000  # no file: defaults


def test_a_bad_set_exits_2_naming_the_flag_and_the_key():
    result = subprocess.run([sys.executable, "-m", "stages.sft", "--config", "stages/sft/configs/sample.yaml",
                             "--set", "method.kind=lora", "--set", "engine.optim.lrr=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --set engine.optim.lrr=1: ") and "unknown key(s) 'lrr' for OptimConfig" in result.stderr
    assert "Traceback" not in result.stderr
