"""Corpus screening at scale: filters on the workers, de-duplication planned on the driver.

    parse_and_screen (Ray Data, per file)   clean -> quality rules -> language -> decontamination
                                            -> MinHash signature; one verdict per input row
    plan (driver, once)                     metadata only (no text): counts, exact + near-duplicate
                                            clusters, repeated paragraphs, routed documents,
                                            rejected samples, manifest sections
    apply_plan (Ray Data, per batch)        drops what the plan removed, routes, cuts paragraphs

Nothing here depends on partitioning: verdicts are per document, the plan sorts documents by
(source, file, line) before it decides, and workers look decisions up by a key of
(source, file, line).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages import storage
from stages.data import decontam, dedup, langid, quality, shingles
from stages.data.documents import doc_hash

SCREEN_SCHEMA = pa.schema([
    ("source", pa.int32()), ("path", pa.string()), ("line", pa.int64()), ("text", pa.string()),
    ("reason", pa.string()), ("doc_hash", pa.int64()), ("doc_key", pa.int64()), ("detail", pa.string()),
    ("lang", pa.string()), ("route", pa.int32()), ("signature", pa.binary()), ("paragraphs", pa.list_(pa.int64())),
    ("snippet", pa.string()),
])
SNIPPET_CHARS = 1000
_INDEX: dict[str, dict] = {}


def doc_key(source: int, path: str, line: int) -> int:
    """63-bit key of an input row (how the plan names a document to the workers)."""
    return doc_hash(f"{source}\x00{path}\x00{line}")


def screen_settings(cfg, index_path: str = "", fs=None) -> dict:
    """Everything parse_and_screen needs, as plain values (shipped to the workers)."""
    return {"quality": dataclasses.asdict(cfg.quality), "language": dataclasses.asdict(cfg.language),
            "decontam": dataclasses.asdict(cfg.decontamination), "dedup": dataclasses.asdict(cfg.dedup),
            "languages": [langid.expected(s.language) for s in cfg.sources], "index_path": index_path, "fs": fs}


def _index(path: str, fs) -> dict:
    if path not in _INDEX:
        _INDEX.clear()
        _INDEX[path] = decontam.from_bytes(storage.read_bytes(fs, path))
    return _INDEX[path]


def _paragraph_hashes(text: str, min_chars: int) -> list[int]:
    return [doc_hash(p) if len(p) >= min_chars else 0 for p in dedup.paragraphs(text)]


def screen_rows(rows: list[dict], settings: dict) -> list[dict]:
    """Quality, language, decontamination and MinHash for parsed rows (reason "" = so far kept)."""
    q = quality.QualityConfig(**settings["quality"])
    lang_cfg = langid.LanguageConfig(**settings["language"])
    dc = decontam.DecontamConfig(**settings["decontam"])
    dd = dedup.DedupConfig(**settings["dedup"])
    languages = settings["languages"]
    index = _index(settings["index_path"], settings["fs"]) if dc.enabled and settings["index_path"] else None
    a, b = dedup.permutations(dd.num_perm, dd.seed)
    for r in rows:
        r.update(doc_key=doc_key(r["source"], r["path"], r["line"]), detail="", lang="", route=-1,
                 signature=b"", paragraphs=[], snippet="")
        if r["reason"]:
            continue
        text = r["text"]
        toks = shingles.tokens(text)
        hashes = shingles.token_hashes(toks)
        rule = quality.check(text, q, toks, hashes)
        if rule:
            r.update(reason="quality", detail=rule)
        if not r["reason"] and lang_cfg.enabled:
            code, prob = langid.detect(text, lang_cfg.max_chars)
            r["lang"] = code
            expected = languages[r["source"]]
            code = langid.family(code)
            if expected and code not in expected and prob >= lang_cfg.min_confidence:
                r["detail"] = f"{'|'.join(expected)}->{code}"
                if lang_cfg.mismatch == "drop":
                    r["reason"] = "language"
                elif lang_cfg.mismatch == "route":
                    target = next((i for i, l in enumerate(languages) if code in l), -1)
                    if target < 0:
                        r["reason"] = "language"
                    else:
                        r["route"] = target
        if not r["reason"] and index is not None:
            hits = decontam.matches(text, index, dc, toks=toks, hashes=hashes)
            if hits:
                r.update(reason="contaminated", detail=",".join(index["names"][t] for t in hits))
        if r["reason"]:
            r["snippet"], r["text"] = text[:SNIPPET_CHARS], ""
            continue
        if dd.near:
            r["signature"] = dedup.signature(dedup.shingles(text, dd.shingle_size, hashes=hashes), a, b).tobytes()
        if dd.paragraphs:
            r["paragraphs"] = _paragraph_hashes(text, dd.min_paragraph_chars)
    return rows


def parse_and_screen(batch: dict, sources: list[dict], clean: dict, screen: dict) -> pa.Table:
    """read_binary_files batch (bytes, path) -> one row per input row with its verdict: the
    columns of `steps.parse_files` (whatever it adds flows through), then the screening's."""
    from stages.data.steps import parse_files

    parsed = parse_files(batch, sources, clean)
    rows = screen_rows(parsed.to_pylist(), screen)
    schema = pa.schema(list(parsed.schema) + [f for f in SCREEN_SCHEMA if f.name not in parsed.schema.names])
    return pa.Table.from_pylist(rows, schema=schema)


# --- the driver's plan ---------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    counts: dict            # (source, reason) -> rows, every input row once ("duplicate"/"near_duplicate" included)
    duplicates: dict        # source -> exact duplicates removed
    removed: np.ndarray     # sorted doc keys dropped by de-duplication
    routed: dict            # doc key -> new source index
    cut: dict               # doc key -> paragraph indices removed
    sections: dict          # manifest sections: quality, language, decontamination, dedup
    per_source: dict        # source -> extra manifest fields
    samples: dict           # rule -> [{source, path, line, snippet}]
    clusters: pa.Table      # documents in clusters of 2 or more

    def kwargs(self) -> dict:
        return {"removed": self.removed, "routed": self.routed, "cut": self.cut}


META_COLUMNS = ["source", "path", "line", "reason", "doc_hash", "doc_key", "detail", "lang", "route",
                "signature", "paragraphs", "snippet"]


def collect(docs) -> pa.Table:
    """The metadata columns of a (materialized) Ray dataset, in one pass, no text."""
    import ray

    tables = ray.get(docs.select_columns(META_COLUMNS).to_arrow_refs())
    return pa.concat_tables(tables) if tables else SCREEN_SCHEMA.empty_table().select(META_COLUMNS)


def plan(meta: pa.Table, cfg, task_names: list[str] | None = None, sample_size: int = 20) -> Plan:
    """Counts and de-duplication decisions from every row's metadata (any row order)."""
    dd = cfg.dedup
    order = sorted(range(meta.num_rows), key=lambda i: (meta["source"][i].as_py(), meta["path"][i].as_py(),
                                                        meta["line"][i].as_py()))
    meta = meta.take(pa.array(order, pa.int64())) if meta.num_rows else meta
    source = meta["source"].to_numpy().astype(np.int64)
    reason = meta["reason"].to_pylist()
    detail = meta["detail"].to_pylist()
    counts = Counter(zip(source.tolist(), reason))
    per_source = {i: {"quality_rejected": Counter(), "languages": Counter(), "language_mismatch": 0,
                      "routed_in": 0, "routed_out": 0, "contaminated": Counter(),
                      "near_duplicate": 0, "paragraphs_removed": 0} for i in range(len(cfg.sources))}
    tasks = Counter()
    samples: dict[str, list] = defaultdict(list)
    snippet, path, line = meta["snippet"].to_pylist(), meta["path"].to_pylist(), meta["line"].to_pylist()
    for i, (s, r, d, lang) in enumerate(zip(source.tolist(), reason, detail, meta["lang"].to_pylist())):
        ps = per_source[s]
        if lang:
            ps["languages"][lang] += 1
        if "->" in d:
            ps["language_mismatch"] += 1
        rule = {"quality": d, "language": "language", "contaminated": "contaminated"}.get(r)
        if r == "quality":
            ps["quality_rejected"][d] += 1
        elif r == "contaminated":
            for t in d.split(","):
                ps["contaminated"][t] += 1
                tasks[t] += 1
        if rule and len(samples[rule]) < sample_size:
            samples[rule].append({"source": cfg.sources[s].name, "path": path[i], "line": line[i], "detail": d,
                                  "text": snippet[i]})

    # de-duplication among the documents still kept, in keep order
    kept = np.flatnonzero(np.array([r == "" for r in reason], dtype=bool))
    exact = meta["doc_hash"].to_numpy()[kept]
    signatures = np.zeros((len(kept), dd.num_perm), dtype=np.uint32)
    if dd.near and len(kept):
        sig_col = meta["signature"].take(pa.array(kept))
        signatures = np.frombuffer(b"".join(sig_col.to_pylist()), dtype=np.uint32).reshape(len(kept), dd.num_perm)
    roots, stats = dedup.clusters(signatures, exact, dd)
    keys = meta["doc_key"].to_numpy()
    removed_keys, cluster_rows = [], []
    sizes = Counter(roots.tolist())
    first_hashes: dict[int, set] = defaultdict(set)
    for n, (doc, root) in enumerate(zip(kept.tolist(), roots.tolist())):
        size = sizes[root]
        if size > 1:
            cluster_rows.append({"source": cfg.sources[int(source[doc])].name, "path": path[doc], "line": line[doc],
                                 "cluster": int(exact[root]), "cluster_size": size, "kept": n == root})
        if n == root:
            first_hashes[root].add(int(exact[n]))
            continue
        removed_keys.append(int(keys[doc]))
        kind = "duplicate" if int(exact[n]) in first_hashes[root] else "near_duplicate"
        first_hashes[root].add(int(exact[n]))
        counts[(int(source[doc]), "")] -= 1
        counts[(int(source[doc]), kind)] += 1
    duplicates = {s: counts.get((s, "duplicate"), 0) for s in range(len(cfg.sources))}
    for s in range(len(cfg.sources)):
        per_source[s]["near_duplicate"] = counts.get((s, "near_duplicate"), 0)
    histogram = Counter(sizes[r] for r in set(roots.tolist()))

    # routing and repeated paragraphs among the survivors
    removed_set = set(removed_keys)
    survivors = [d for d in kept.tolist() if int(keys[d]) not in removed_set]
    routed = {}
    route = meta["route"].to_numpy()
    for d in survivors:
        if route[d] >= 0:
            routed[int(keys[d])] = int(route[d])
            per_source[int(source[d])]["routed_out"] += 1
            per_source[int(route[d])]["routed_in"] += 1
    cut = {}
    if dd.paragraphs:
        para = meta["paragraphs"]
        repeats = dedup.repeated_paragraphs([np.asarray(para[d].as_py(), dtype=np.int64) for d in survivors])
        for n, drop in repeats.items():
            d = survivors[n]
            cut[int(keys[d])] = drop
            per_source[int(source[d])]["paragraphs_removed"] += len(drop)

    lang_cfg = cfg.language
    sections = {
        "quality": {"enabled": cfg.quality.enabled, "rules": list(quality.RULES),
                    "rejected": dict(sorted(sum((p["quality_rejected"] for p in per_source.values()), Counter()).items()))},
        "language": {"enabled": lang_cfg.enabled, "mismatch": lang_cfg.mismatch, "min_confidence": lang_cfg.min_confidence,
                     "detector": "py3langid", "detected": dict(sorted(sum((p["languages"] for p in per_source.values()),
                                                                           Counter()).items()))},
        "decontamination": {"enabled": cfg.decontamination.enabled, "ngram": cfg.decontamination.ngram,
                            "cjk_ngram": cfg.decontamination.cjk_ngram,
                            "documents_per_task": {t: tasks.get(t, 0) for t in (task_names or sorted(tasks))}},
        "dedup": {"near": dd.near, "shingle_size": dd.shingle_size, "num_perm": dd.num_perm, "bands": dd.bands,
                  "threshold": dd.threshold, "paragraphs": dd.paragraphs, **stats,
                  "clusters": sum(v for k, v in histogram.items() if k > 1),
                  "cluster_sizes": {str(k): v for k, v in sorted(histogram.items()) if k > 1},
                  "removed": len(removed_keys), "paragraphs_removed": sum(len(v) for v in cut.values())},
    }
    extra = {}
    for s, p in per_source.items():
        extra[s] = {"quality_rejected": dict(sorted(p["quality_rejected"].items())),
                    "detected_languages": dict(sorted(p["languages"].items())),
                    "language_mismatch": p["language_mismatch"], "routed_out": p["routed_out"],
                    "routed_in": p["routed_in"], "contaminated": dict(sorted(p["contaminated"].items())),
                    "paragraphs_removed": p["paragraphs_removed"]}
    table = pa.Table.from_pylist(cluster_rows, schema=CLUSTER_SCHEMA)
    return Plan(dict(counts), duplicates, np.array(sorted(removed_keys), dtype=np.int64), routed, cut, sections,
                extra, dict(samples), table)


CLUSTER_SCHEMA = pa.schema([("source", pa.string()), ("path", pa.string()), ("line", pa.int64()),
                            ("cluster", pa.int64()), ("cluster_size", pa.int32()), ("kept", pa.bool_())])


def apply_plan(batch: pa.Table, removed: np.ndarray, routed: dict, cut: dict) -> pa.Table:
    """Keep the rows screening kept (reason ""), drop de-duplicated documents, route, cut repeated
    paragraphs. Returns the columns assign_buckets reads (duplicate = False: duplicates are gone)."""
    batch = batch.filter(pc.equal(batch["reason"], ""))
    keys = batch["doc_key"].to_numpy()
    if len(removed):
        pos = np.minimum(np.searchsorted(removed, keys), len(removed) - 1)
        keep = removed[pos] != keys
    else:
        keep = np.ones(len(keys), dtype=bool)
    batch = batch.filter(pa.array(keep))
    texts, sources, hashes = batch["text"].to_pylist(), batch["source"].to_pylist(), batch["doc_hash"].to_pylist()
    if routed or cut:
        for i, k in enumerate(batch["doc_key"].to_pylist()):
            if k in routed:
                sources[i] = routed[k]
            if k in cut:
                drop = set(cut[k])
                texts[i] = "\n\n".join(p for j, p in enumerate(dedup.paragraphs(texts[i])) if j not in drop)
                hashes[i] = doc_hash(texts[i])
    return pa.table({"text": pa.array(texts, pa.string()), "source": pa.array(sources, pa.int32()),
                     "doc_hash": pa.array(hashes, pa.int64()), "duplicate": pa.array([False] * len(texts))})


def write_side_files(p: Plan, fs, staging: str) -> dict:
    """rejected/<rule>.jsonl (samples per rule) and dedup_clusters.parquet beside the manifest."""
    import io

    import pyarrow.parquet as pq

    files = {}
    for rule, rows in sorted(p.samples.items()):
        name = f"rejected/{rule}.jsonl"
        storage.write_bytes(fs, posixpath.join(staging, name),
                            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        files[rule] = name
    buffer = io.BytesIO()
    pq.write_table(p.clusters, buffer, compression="zstd")
    storage.write_bytes(fs, posixpath.join(staging, "dedup_clusters.parquet"), buffer.getvalue())
    return {"rejected_samples": files, "clusters_file": "dedup_clusters.parquet"}


def inputs_fingerprint(cfg) -> dict:
    """Size and modification time (or ETag-like identity where the file system gives none) of
    every input file: corpora, MIP sets and evaluation sets used for decontamination."""
    import pyarrow.fs as pafs

    entries = []
    uris = [s.uri for s in cfg.sources] + [d.uri for d in cfg.mip.datasets]
    try:
        uris += decontam.input_files(cfg.decontamination)
    except (FileNotFoundError, Exception) as e:  # a broken task path is reported by the run itself
        entries.append(f"tasks-error:{e}")
    for uri in uris:
        fs, files = storage.expand(uri)
        for info in fs.get_file_info(files):
            mtime = info.mtime_ns if info.mtime_ns is not None else ""
            entries.append(f"{info.path}\x00{info.size}\x00{mtime}" if info.type == pafs.FileType.File else
                           f"{info.path}\x00missing")
    digest = hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]
    return {"fingerprint": digest, "files": len(entries)}


def add_to_manifest(manifest: dict, p: Plan, cfg, inputs: dict, side_files: dict) -> None:
    """The plan's sections and per-source counts, the input fingerprint and the side files."""
    manifest["inputs"] = inputs
    manifest.update(p.sections)
    manifest["dedup"]["clusters_file"] = side_files["clusters_file"]
    manifest["rejected_samples"] = side_files["rejected_samples"]
    for i, s in enumerate(cfg.sources):
        manifest["sources"][s.name].update(p.per_source[i])
