"""The cluster manifests in infra/ parse and keep their key structure, so they cannot rot silently.

No cluster is needed: the Ray cluster launcher YAML is checked against Ray's own schema, the
Kubernetes objects against the fields of the KubeRay ray.io/v1 CRD and the core API that the
pipeline relies on, and the images against the pins of the Makefile / requirements.lock.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
CLUSTER = INFRA / "cluster.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
MLFLOW_K8S = INFRA / "mlflow" / "k8s.yaml"
DOCKERFILE = INFRA / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"

# Fields of the KubeRay ray.io/v1 CRD (RayJobSpec, RayClusterSpec, HeadGroupSpec,
# WorkerGroupSpec): a misspelt key is silently dropped by the API server, so name them here.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYCLUSTER_SPEC_FIELDS = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
GPU_INSTANCE_TYPES = {"p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"}


def load_docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            pins[name.lower().replace("_", "-")] = version
    return pins


def torch_pin() -> str:
    [pin] = re.findall(r"^TORCH\s*:=\s*torch==(\S+)", (REPO / "Makefile").read_text(), re.M)
    return pin


def allows_host(allowed: str, host: str) -> bool:
    """MLflow's Host-header rule (mlflow.server.security_utils): exact, or fnmatch with '*'."""
    import fnmatch

    return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed.split(","))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def rayjob() -> dict:
    [job] = by_kind(load_docs(RAYJOB), "RayJob")
    return job


def ray_pod_specs(job: dict) -> list[tuple[str, dict]]:
    cluster = job["spec"]["rayClusterSpec"]
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    return pods


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# ---------------------------------------------------------------- every YAML


def infra_yamls() -> list[str]:
    return sorted(p.relative_to(REPO).as_posix() for p in INFRA.rglob("*.y*ml"))


def test_manifests_exist():
    assert set(infra_yamls()) >= {
        "infra/cluster.yaml", "infra/kuberay/rayjob.yaml", "infra/mlflow/docker-compose.yaml", "infra/mlflow/k8s.yaml",
    }


@pytest.mark.parametrize("rel", infra_yamls())
def test_yaml_parses(rel):
    docs = load_docs(REPO / rel)
    assert docs and all(isinstance(d, dict) for d in docs), f"{rel}: every document must be a mapping"
    for d in docs:
        if "apiVersion" in d:  # a Kubernetes object
            assert d.get("kind") and d.get("metadata", {}).get("name"), f"{rel}: object without kind or name"


# ---------------------------------------------------------------- KubeRay RayJob


def test_rayjob_fields():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, f"unknown RayJob fields {set(spec) - RAYJOB_SPEC_FIELDS}"
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, f"unknown RayCluster fields {set(cluster) - RAYCLUSTER_SPEC_FIELDS}"
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, f"{group['groupName']}: unknown fields {set(group) - WORKER_GROUP_FIELDS}"
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group["maxReplicas"]
    assert spec["submissionMode"] in SUBMISSION_MODES
    # Retries resume, and the cluster goes away once the job has ended.
    assert spec["backoffLimit"] >= 1
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert cluster["rayVersion"] == lock_pins()["ray"]


def test_rayjob_entrypoint_and_run_name():
    spec = rayjob()["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "pipelines/full.py"], spec["entrypoint"]
    config = argv[argv.index("--config") + 1]
    assert config.startswith("pipelines/configs/") and config.endswith(".yaml")
    # The run name comes from the RayJob's name: the entrypoint passes $GLM_RUN_NAME, which the
    # submitter's shell expands (K8sJobMode), where the downward API sets it from the label the
    # Job controller puts on the submitter Job's pods (the Job is named after the RayJob).
    assert argv[argv.index("--run-name") + 1] in ("${GLM_RUN_NAME}", "$GLM_RUN_NAME")
    assert spec["submissionMode"] == "K8sJobMode"
    [submitter] = spec["submitterPodTemplate"]["spec"]["containers"][:1]
    env = {e["name"]: e for e in submitter["env"]}
    field = env["GLM_RUN_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field in ("metadata.labels['batch.kubernetes.io/job-name']", "metadata.labels['job-name']")


def test_rayjob_config_exists_once_gpu_configs_do():
    gpu_configs = [p.name for p in (REPO / "pipelines" / "configs").glob("*.yaml") if p.name != "smoke.yaml"]
    if not (REPO / "pipelines" / "full.py").exists() or not gpu_configs:
        pytest.skip("no GPU pipeline config in this checkout yet")
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file(), f"the RayJob runs {config}, but pipelines/configs/ has {sorted(gpu_configs)}"


def test_rayjob_gpu_workers_and_shm():
    job = rayjob()
    gpu_groups = []
    for name, pod in ray_pod_specs(job):
        [ray_container] = pod["containers"][:1]
        limits = ray_container["resources"]["limits"]
        requests = ray_container["resources"].get("requests", {})
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(name)
            # Extended resources: requests must equal limits.
            assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"] >= 1
        # /dev/shm from an in-memory emptyDir on every Ray pod (object store, NCCL).
        mounts = {m["mountPath"]: m["name"] for m in ray_container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "/dev/shm" in mounts, f"{name}: no /dev/shm mount"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", f"{name}: /dev/shm not in memory"
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    assert "nvidia.com/gpu" not in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_rayjob_one_image_env_and_ports():
    docs = load_docs(RAYJOB)
    job = rayjob()
    images = {pod["containers"][0]["image"] for _, pod in ray_pod_specs(job)}
    images.add(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"])
    assert len(images) == 1, f"head, workers and submitter must run one image: {images}"
    configmaps = {c["metadata"]["name"]: c["data"] for c in by_kind(docs, "ConfigMap")}
    for name, pod in ray_pod_specs(job):
        refs = [e["configMapRef"]["name"] for e in pod["containers"][0].get("envFrom", []) if "configMapRef" in e]
        assert any("MLFLOW_TRACKING_URI" in configmaps.get(r, {}) for r in refs), f"{name}: no MLFLOW_TRACKING_URI"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["containerPort"] for p in head["ports"]}
    assert {8265, 8000} <= ports, "head must expose the dashboard (8265) and Ray Serve (8000)"
    # Ray Serve's proxy binds 127.0.0.1 by default: the head Service could not reach it.
    assert any(cm.get("RAY_SERVE_DEFAULT_HTTP_HOST") == "0.0.0.0" for cm in configmaps.values())


def test_rayjob_points_at_the_mlflow_service():
    [cm] = [c for c in by_kind(load_docs(RAYJOB), "ConfigMap") if "MLFLOW_TRACKING_URI" in c["data"]]
    uri = cm["data"]["MLFLOW_TRACKING_URI"]
    [service] = by_kind(load_docs(MLFLOW_K8S), "Service")
    host_port = f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert uri == f"http://{host_port}", f"{uri} is not the MLflow Service of infra/mlflow/k8s.yaml ({host_port})"


# ---------------------------------------------------------------- Ray cluster launcher


def test_cluster_yaml_structure():
    cfg = load_docs(CLUSTER)[0]
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    workers = {name: t for name, t in types.items() if name != head}
    assert workers, "no worker node types"
    gpu = [name for name, t in workers.items() if t["node_config"]["InstanceType"] in GPU_INSTANCE_TYPES]
    assert gpu, "no 8-GPU worker node type"
    assert types[head]["node_config"]["InstanceType"] not in GPU_INSTANCE_TYPES, "head should be CPU-only"
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"], name
    docker = cfg["docker"]
    assert docker["image"] == rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert any(o.startswith("--shm-size") for o in docker["worker_run_options"])
    assert any("MLFLOW_TRACKING_URI=" in o for o in docker["run_options"])
    assert any("RAY_SERVE_DEFAULT_HTTP_HOST=0.0.0.0" in o for o in docker["run_options"])
    assert any("--head" in c for c in cfg["head_start_ray_commands"])


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load_docs(CLUSTER)[0]))


# ---------------------------------------------------------------- MLflow server


def test_compose_services():
    compose = load_docs(COMPOSE)[0]
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")
    mlflow = services["mlflow"]
    args = dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), True) for a in mlflow["command"])
    backend = args["backend-store-uri"]
    assert backend.startswith("postgresql://") and "@postgres:5432/" in backend, backend
    dest = args["artifacts-destination"]
    assert dest.startswith("s3://") and args.get("serve-artifacts") is True
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # mlflow 3.x answers 403 to Host headers it does not know: its service name must be listed.
    assert allows_host(args["allowed-hosts"], "mlflow:5000") and allows_host(args["allowed-hosts"], "localhost:5000")
    assert {"postgres", "create-buckets"} <= set(mlflow["depends_on"])
    # The artifact bucket is created before the server starts.
    bucket = dest.removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in "\n".join(services["create-buckets"]["entrypoint"])
    build = mlflow["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == MLFLOW_DOCKERFILE.resolve()


def test_mlflow_k8s_deployment_and_service():
    docs = load_docs(MLFLOW_K8S)
    [deployment] = by_kind(docs, "Deployment")
    [service] = by_kind(docs, "Service")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [container] = pod["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in port_names
    assert container["image"].endswith(":" + lock_pins()["mlflow"])
    assert any(a.startswith("--artifacts-destination=s3://") for a in container["args"])
    [hosts] = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--allowed-hosts=")]
    name, port = service["metadata"]["name"], service["spec"]["ports"][0]["port"]
    for host in (f"{name}:{port}", f"{name}.glm.svc.cluster.local:{port}", f"localhost:{port}"):
        assert allows_host(hosts, host), f"--allowed-hosts rejects {host}"
    secrets = {s["metadata"]["name"]: s["stringData"] for s in by_kind(docs, "Secret")}
    refs = [e["secretRef"]["name"] for e in container["envFrom"]]
    backend = [secrets[r]["MLFLOW_BACKEND_STORE_URI"] for r in refs if "MLFLOW_BACKEND_STORE_URI" in secrets.get(r, {})]
    assert backend and backend[0].startswith("postgresql://")


# ---------------------------------------------------------------- images


def test_pipeline_image_installs_like_make_setup():
    steps = dockerfile_instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == torch_pin(), "Dockerfile torch differs from the Makefile's"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"torch=={torch_pin()}"' in pyproject
    assert re.search(r"python:3\.11", args["PYTHON_IMAGE"]), "Python 3.11 base expected"
    runs = [a for kind, a in steps if kind == "RUN"]

    def first(pattern: str) -> int:
        hits = [i for i, r in enumerate(runs) if re.search(pattern, r)]
        assert hits, f"no RUN step matches {pattern!r}"
        return hits[0]

    torch_step = first(r"pip install .*torch==\$\{TORCH_VERSION\}")
    lock_step = first(r"pip install -r requirements\.lock")
    repo_step = first(r"pip install --no-deps .*-e \.")
    assert torch_step < lock_step < repo_step, "install order must be torch, requirements.lock, the repo"
    copies = [a for kind, a in steps if kind == "COPY"]
    assert "requirements.lock ./" in copies and ". ." in copies
    assert ("WORKDIR", "/app") in steps


def test_mlflow_image_pins_match_the_lock():
    pins = lock_pins()
    [install] = [a for kind, a in dockerfile_instructions(MLFLOW_DOCKERFILE) if kind == "RUN" and "pip install" in a]
    wanted = dict(m for m in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s&]*)", install))
    assert wanted["mlflow"] == pins["mlflow"]
    assert {"psycopg2-binary", "boto3"} <= set(wanted)
    for name, version in wanted.items():
        key = name.lower().replace("_", "-")
        if key in pins:
            assert pins[key] == version, f"{name}=={version} but requirements.lock has {pins[key]}"


def test_dockerignore_keeps_the_context_small():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs"} <= ignored


def test_docs_cover_every_manifest():
    text = (REPO / "docs" / "cluster.md").read_text()
    for path in [*infra_yamls(), "infra/Dockerfile", "infra/mlflow/Dockerfile"]:
        assert path in text, f"docs/cluster.md does not mention {path}"
