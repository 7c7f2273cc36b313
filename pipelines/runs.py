"""Run identity: each engine run of a training stage (its Ray Train name and storage folder,
its engine checkpoints, its MLflow run) is keyed by the stage's config hash from the chain in
`pipelines.markers`. The same config finds its own run and resumes it; a changed config gets a
new run that starts at step 1 and leaves the old one as it was. Continuing another run's
state on purpose is explicit: `engine.resume_from` (CLI `--resume-from-run RUN=NAME`)."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from glm.config import ConfigError
from pipelines.config import PipelineConfig
from pipelines.markers import fingerprint
from stages import storage

HASH_CHARS = 8
"""Characters of the config hash appended to an engine run name: `<pipeline>-<run>-<hash[:8]>`."""


@dataclass
class EngineRun:
    """One engine run of a stage: `label` (pretrain, sft, reward, ppo, grpo, rloo, dpo), its engine config
    (run_name and storage_path set), the config hash it is keyed by."""

    label: str
    engine: object
    config_hash: str

    @property
    def run_dir(self) -> str:
        return posixpath.join(self.engine.storage_path, self.engine.run_name)


def engine_sections(stage: str, cfg) -> list[tuple[str, object]]:
    """(label, typed section holding `engine`) of each engine run a stage makes, in run order."""
    if stage in ("pretrain", "sft"):
        return [(stage, cfg)]
    if stage == "rlhf":
        return ([("reward", cfg.reward)] if cfg.reward is not None else []) + [(cfg.policy.mode, cfg.policy)]
    return []


def key_runs(stage: str, cfg, upstream: str) -> list[EngineRun]:
    """Append each engine run's config hash to its run name (in place) and return the runs.

    The hash of a run covers its section (engine run name, fault injection and tracking
    excluded, see `fingerprint`) and `upstream`; within RLHF the policy's chains on the reward
    model's, so a changed policy config retrains the policy only."""
    runs = []
    for label, section in engine_sections(stage, cfg):
        upstream = fingerprint(section, upstream)
        section.engine.run_name = f"{section.engine.run_name}-{upstream[:HASH_CHARS]}"
        runs.append(EngineRun(label, section.engine, upstream))
    return runs


def describe(run: EngineRun) -> str:
    """One line for the log: a fresh run from step 1, resuming its own checkpoints, or starting
    from another run's (resume_from); and which runs of other configs are left as they were."""
    from stages.engine.checkpoints import CheckpointStore

    own, _ = CheckpointStore(run.run_dir).latest()
    head = f"{run.label} run {run.engine.run_name} (config {run.config_hash})"
    if own:
        line = f"{head}: resuming from its own checkpoint ({posixpath.basename(own.uri)}, step {own.record['step']})"
    elif run.engine.resume_from:
        line = f"{head}: new run, starting from the newest checkpoint of {run.engine.resume_from} (resume_from)"
    else:
        line = f"{head}: fresh run from step 1"
    others = _other_runs(run)
    if others:
        line += f"; runs of other configs left as they are: {', '.join(others)}"
    return line


def _other_runs(run: EngineRun) -> list[str]:
    import pyarrow.fs as pafs

    fs, root = storage.resolve(run.engine.storage_path)
    prefix = run.engine.run_name[:-HASH_CHARS]
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(n for n in (posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)
                  if n.startswith(prefix) and len(n) == len(run.engine.run_name) and n != run.engine.run_name)


def apply_resume_from(p: PipelineConfig, requests: list[str]) -> None:
    """`--resume-from-run RUN=NAME` (repeatable): set engine.resume_from of the engine run RUN
    (pretrain, sft, reward, ppo, grpo, rloo or dpo) to NAME, an engine run name under that run's storage
    (`<work_dir>/ray/NAME`) or a run / checkpoint directory path or URI."""
    for request in requests:
        label, sep, source = request.partition("=")
        if not sep or not source:
            raise ConfigError(f"--resume-from-run {request!r}: expected RUN=NAME, e.g. pretrain=glm-pretrain-1a2b3c4d")
        section = _section(p, label)
        engine = section.setdefault("engine", {})
        if "/" not in source and "://" not in source:  # a run name: under the run's storage
            storage_path = engine.get("storage_path") or posixpath.join(p.work_dir.replace("{name}", p.name), "ray")
            source = posixpath.join(storage.absolute(storage_path), source)
        engine["resume_from"] = source


def _section(p: PipelineConfig, label: str) -> dict:
    if label in ("pretrain", "sft"):
        return p.pretrain if label == "pretrain" else p.sft
    if label == "reward":
        if "reward" not in p.rlhf:
            raise ConfigError("--resume-from-run reward=...: this pipeline trains no reward model (rlhf.reward)")
        return p.rlhf["reward"]
    policy = p.rlhf.setdefault("policy", {})
    if label in ("ppo", "grpo", "rloo", "dpo") and policy.get("mode", "ppo") == label:
        return policy
    raise ConfigError(f"--resume-from-run {label}=...: not an engine run of this pipeline; "
                      f"choose from pretrain, sft, reward, {policy.get('mode', 'ppo')}")
