"""Bounded memory: the data stage on a corpus several times larger than the Ray object store it is
given finishes by spilling to disk (its own Ray instance, in a subprocess)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration

STORE_MB, CORPUS_MB = 8, 24

JOB = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path

    import ray
    import ray._private.ray_constants as constants

    work, store_mb, corpus_mb = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES = 1 << 20  # Ray refuses stores under 75 MiB otherwise
    import socket
    import ray._private.parameter as parameter

    with socket.socket() as s:  # the dashboard agent's fixed default port may be another instance's
        s.bind(("127.0.0.1", 0))
        agent_port = s.getsockname()[1]
    _init = parameter.RayParams.__init__

    def _params(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", agent_port)
        _init(self, *args, **kwargs)

    parameter.RayParams.__init__ = _params
    ray.init(num_cpus=4, object_store_memory=store_mb << 20, include_dashboard=False, log_to_driver=False,
             object_spilling_directory=str(work / "spill"), _temp_dir=sys.argv[5])

    from glm.tokenizer import train_tokenizer
    from stages.data.config import CorpusSource, DataConfig, MIPConfig, ObjectiveConfig, TokenizerSettings
    from stages.data.decontam import DecontamConfig
    from stages.data.dedup import DedupConfig
    from stages.data.langid import LanguageConfig
    from stages.data.quality import QualityConfig
    from stages.data.stage import run

    sample = Path(sys.argv[4])
    docs = [json.loads(l)["text"] for l in open(sample / "pretrain/en_gutenberg.jsonl", encoding="utf-8")][:40]
    (work / "corpus").mkdir()
    size, n = 0, 0
    for part in range(4):  # a crawl-like corpus: the same 40 documents over and over
        with open(work / "corpus" / f"c{part}.jsonl", "w", encoding="utf-8") as f:
            while size < (corpus_mb << 20) * (part + 1) // 4:
                line = json.dumps({"text": docs[n % len(docs)]}) + "\\n"
                f.write(line)
                size, n = size + len(line), n + 1
    tok = train_tokenizer(docs, 1000, character_coverage=0.995).save(work)
    cfg = DataConfig(
        sources=[CorpusSource(uri=str(work / "corpus/*.jsonl"), name="c")], output=str(work / "out"),
        tokenizer=TokenizerSettings(path=str(tok)), objective=ObjectiveConfig(seq_len=64, mask_window=32),
        mip=MIPConfig(token_share=0.0), quality=QualityConfig(enabled=False), language=LanguageConfig(enabled=False),
        decontamination=DecontamConfig(enabled=False), dedup=DedupConfig(near=False), num_buckets=2)
    run(cfg)
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    spilled = re.search(r"Spilled (\\d+) MiB", summary)
    manifest = json.loads((work / "out/manifest.json").read_text())
    print("RESULT " + json.dumps({"rows": n, "bytes": size, "spilled_mib": int(spilled.group(1)) if spilled else 0,
                                  "source": manifest["sources"]["c"]}))
    ray.shutdown()
""")


def test_stage_spills_when_the_corpus_exceeds_the_object_store(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_raylet_start_wait_time_s", "180")  # a busy machine starts the raylet and its agents slowly
    env.setdefault("RAY_agent_register_timeout_ms", "180000")
    proc = subprocess.run([sys.executable, "-c", JOB, str(tmp_path), str(STORE_MB), str(CORPUS_MB),
                           str(REPO / "data/sample"), ray_tmp], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=900)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["bytes"] >= 3 * (STORE_MB << 20)
    assert result["spilled_mib"] > 0, "nothing was spilled"
    src = result["source"]
    assert src["rows_read"] == result["rows"] and src["kept"] == 40
    assert src["rejected"]["duplicate"] == result["rows"] - 40
