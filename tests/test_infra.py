"""infra/: every manifest parses, names jobs and config keys that exist, pins the Ray version
of pyproject.toml, and holds no secret value.

Parse-level checks only (no Kubernetes, Docker or AWS here); the AWS cluster launcher config
is also validated against Ray's own schema. The local stack has its own live test
(tests/test_stack.py).
"""

from __future__ import annotations

import importlib
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import ConfigError, build_config, load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"

EXPECTED = [
    "README.md",
    "docker/Dockerfile",
    "docker/Dockerfile.dockerignore",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob-prepare.yaml",
    "kuberay/rayjob-train.yaml",
    "kuberay/rayjob-sample.yaml",
    "kuberay/raycronjob-retrain.yaml",
    "kuberay/cronjob-retrain-fallback.yaml",
    "aws/cluster.yaml",
    "mlflow/mlflow.yaml",
]
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}
# Spec fields of KubeRay's CRDs (ray-operator/apis/ray/v1/*_types.go, KubeRay 1.6): a typo
# such as `entryPoint` would be dropped silently by the API server.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
RAYCRONJOB_SPEC_FIELDS = {"schedule", "jobTemplate", "suspend"}
RAYCLUSTER_SPEC_FIELDS = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "authOptions",
    "headGroupSpec", "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy",
    "gcsFaultToleranceOptions", "upgradeStrategy",
}  # fmt: skip
# Environment variable names whose values are secrets: never a literal `value:`.
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|BACKEND_STORE_URI)", re.I)


def ray_version() -> str:
    """The Ray version pinned in pyproject.toml (``ray[...]==X``)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml pins no ray==X")


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def text_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file())


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def embedded_docs(doc: Any) -> list[Any]:
    """Kubernetes objects held as YAML text in a ConfigMap (the fallback's RayJob template)."""
    if not isinstance(doc, dict) or doc.get("kind") != "ConfigMap":
        return []
    found = []
    for key, value in (doc.get("data") or {}).items():
        if key.endswith((".yaml", ".yml")):
            found += [d for d in yaml.safe_load_all(value) if d is not None]
    return found


def all_docs() -> list[tuple[str, Any]]:
    """(label, document) for every YAML document under infra/, embedded ones included."""
    docs = []
    for path in yaml_files():
        rel = path.relative_to(REPO)
        try:
            loaded = load_docs(path)
        except yaml.YAMLError:
            continue  # test_every_yaml_parses names it
        for i, doc in enumerate(loaded):
            docs.append((f"{rel}#{i}", doc))
            docs += [(f"{rel}#{i}/embedded", d) for d in embedded_docs(doc)]
    return docs


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def entrypoints() -> list[tuple[str, str]]:
    found = []
    for label, doc in all_docs():
        for node in walk(doc):
            if isinstance(node, dict) and isinstance(node.get("entrypoint"), str):
                found.append((label, node["entrypoint"]))
    return found


def ray_cluster_specs(doc: Any) -> list[dict]:
    """The RayCluster specs in a Ray custom resource (its own or a RayJob's)."""
    if not isinstance(doc, dict):
        return []
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        return [spec]
    if doc.get("kind") == "RayJob":
        return [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []
    if doc.get("kind") == "RayCronJob":
        template = spec.get("jobTemplate") or {}
        return [template["rayClusterSpec"]] if "rayClusterSpec" in template else []
    return []


def containers(node: Any) -> list[dict]:
    out = []
    for item in walk(node):
        if isinstance(item, dict):
            for key in ("containers", "initContainers"):
                if isinstance(item.get(key), list):
                    out += [c for c in item[key] if isinstance(c, dict)]
    return out


def docs_of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(label, d) for label, d in all_docs() if isinstance(d, dict) and d.get("kind") == kind]


# --------------------------------------------------------------------------- parsing


def test_infra_has_every_piece() -> None:
    missing = [name for name in EXPECTED if not (INFRA / name).is_file()]
    assert not missing, f"missing under infra/: {missing}"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses(path: Path) -> None:
    docs = load_docs(path)  # multi-document files: every document
    assert docs, f"{path} holds no YAML document"
    if path.parent.name in ("kuberay", "mlflow"):
        for doc in docs + [e for d in docs for e in embedded_docs(d)]:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion/kind missing"
            meta = doc.get("metadata") or {}
            assert meta.get("name") or meta.get("generateName"), f"{path}: {doc['kind']} unnamed"
            if doc["kind"] in RAY_KINDS:
                assert doc["apiVersion"] == "ray.io/v1", f"{path}: {doc['kind']} not ray.io/v1"


# --------------------------------------------------------------------------- entrypoints


def test_kuberay_spec_fields_exist() -> None:
    checked = 0
    for label, doc in all_docs():
        if not isinstance(doc, dict):
            continue
        spec = doc.get("spec") or {}
        job_specs = []
        if doc.get("kind") == "RayJob":
            job_specs.append(spec)
        elif doc.get("kind") == "RayCronJob":
            assert set(spec) <= RAYCRONJOB_SPEC_FIELDS, (
                f"{label}: {set(spec) - RAYCRONJOB_SPEC_FIELDS}"
            )
            job_specs.append(spec["jobTemplate"])
        for job in job_specs:
            checked += 1
            assert set(job) <= RAYJOB_SPEC_FIELDS, f"{label}: {set(job) - RAYJOB_SPEC_FIELDS}"
            assert not ("clusterSelector" in job and job.get("shutdownAfterJobFinishes")), label
        for cluster in ray_cluster_specs(doc):
            unknown = set(cluster) - RAYCLUSTER_SPEC_FIELDS
            assert not unknown, f"{label}: unknown RayCluster fields {unknown}"
    assert checked >= 5


def test_every_job_has_a_manifest() -> None:
    named = {shlex.split(e)[2] for _, e in entrypoints()}
    assert {"jobs.prepare", "jobs.train", "jobs.sample", "jobs.retrain"} <= named


@pytest.mark.parametrize(("label", "entrypoint"), entrypoints(), ids=lambda v: str(v)[:60])
def test_entrypoint_names_a_job_and_valid_config(label: str, entrypoint: str) -> None:
    tokens = shlex.split(entrypoint)
    assert tokens[:2] == ["python", "-m"], f"{label}: entrypoint is not `python -m jobs.<name>`"
    module_name, args = tokens[2], tokens[3:]
    assert module_name.startswith("jobs."), f"{label}: {module_name} is not a job module"
    path = REPO / (module_name.replace(".", "/") + ".py")
    assert path.is_file(), f"{label}: {module_name} does not exist ({path.relative_to(REPO)})"

    # Every key.path=value names a config key and a valid value, one by one (clear messages).
    overrides = [t for t in args if "=" in t and not t.startswith("-")]
    for override in overrides:
        try:
            build_config(overrides=[override])
        except ConfigError as exc:
            pytest.fail(f"{label}: override {override!r}: {exc}")

    # The job's own parser accepts the flags; flag shortcuts + overrides validate together.
    module = importlib.import_module(module_name)
    assert hasattr(module, "main"), f"{module_name} has no main()"
    if hasattr(module, "build_parser"):
        try:
            parsed = module.build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{label}: `{module_name}` rejects its arguments: {args}")
        extra = module.flag_overrides(parsed) if hasattr(module, "flag_overrides") else []
        config_file = getattr(parsed, "config", None)
        try:
            load_config(
                REPO / config_file if config_file else None,
                [*extra, *getattr(parsed, "overrides", [])],
            )
        except ConfigError as exc:
            pytest.fail(f"{label}: {exc}")


# --------------------------------------------------------------------------- Ray version


def test_ray_version_everywhere_is_pyprojects() -> None:
    version = ray_version()
    seen = {"rayproject image": 0, "rayVersion": 0, "fmpipe image": 0}
    for path in text_files():
        text = path.read_text()
        rel = path.relative_to(REPO)
        for tag in re.findall(r"rayproject/ray(?:-ml|-llm)?:([\w.${}-]+)", text):
            if "$" in tag:
                continue  # a build argument: resolved in the Dockerfile test
            seen["rayproject image"] += 1
            assert tag == version or tag.startswith(version + "-"), f"{rel}: rayproject/ray:{tag}"
        for found in re.findall(r"rayVersion:\s*['\"]?([\w.]+)", text):
            seen["rayVersion"] += 1
            assert found == version, f"{rel}: rayVersion {found} != {version}"
        for found in re.findall(r"\bray(?:\[[^\]]*\])?\s*==\s*([\w.]+)", text):
            assert found == version, f"{rel}: ray=={found} != {version}"
        for found in re.findall(r"/fmpipe:[\w.]*-ray(\d+\.\d+\.\d+)", text):
            seen["fmpipe image"] += 1
            assert found == version, f"{rel}: fmpipe image built on Ray {found} != {version}"
    assert all(seen.values()), f"nothing to check for some pins: {seen}"


def test_every_ray_cluster_runs_the_pinned_ray() -> None:
    version = ray_version()
    specs = 0
    for label, doc in all_docs():
        for spec in ray_cluster_specs(doc):
            specs += 1
            assert spec.get("rayVersion") == version, f"{label}: rayVersion"
            assert (spec.get("authOptions") or {}).get("mode") == "token", f"{label}: no token auth"
            for container in containers(spec):
                image = container["image"]
                assert f"-ray{version}-" in image or f"rayproject/ray:{version}" in image, (
                    f"{label}: container {container['name']} runs {image}"
                )
        if isinstance(doc, dict) and doc.get("kind") in RAY_KINDS:
            for container in containers(doc):  # submitter pods too
                assert version in container["image"], f"{label}: {container['image']}"
    assert specs >= 2  # the long-running cluster and the train job's own


def _dockerfile_from(path: Path) -> tuple[str, dict[str, str]]:
    args: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("ARG ") and "=" in line:
            name, default = line[4:].split("=", 1)
            args[name.strip()] = default.strip()
        if line.startswith("FROM "):
            image = line.split()[1]
            for name, value in args.items():
                image = image.replace("${" + name + "}", value).replace("$" + name, value)
            return image, args
    raise AssertionError(f"{path}: no FROM")


def test_dockerfile_base_image_matches_ray_version() -> None:
    version = ray_version()
    dockerfile = INFRA / "docker" / "Dockerfile"
    image, args = _dockerfile_from(dockerfile)
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", image
    assert tag.startswith(f"{version}-py311"), f"base image {image}: not Ray {version}, py3.11"
    text = dockerfile.read_text()
    assert "RAY_TAG" in args, "the base image tag is not a build argument"
    gpu_tags = re.findall(r"RAY_TAG=([\w.-]+)", text)
    assert any("-cu12" in t for t in gpu_tags), "no GPU (CUDA 12) tag documented for RAY_TAG"
    assert all(t.startswith(version + "-") for t in gpu_tags), gpu_tags
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", text), "the project is not installed"
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*", "context is not an allow-list"
    assert not any(line.startswith("!.") for line in ignore), "a dot-directory is let in"


# --------------------------------------------------------------------------- secrets


def test_no_literal_secret_values() -> None:
    for label, doc in all_docs():
        if isinstance(doc, dict) and doc.get("kind") == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), f"{label}: a Secret value"
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
            for key in doc.get("data") or {}:
                assert not SECRET_NAME.search(key), f"{label}: ConfigMap key {key}"
        for node in walk(doc):
            if isinstance(node, dict) and isinstance(node.get("name"), str) and "value" in node:
                assert not SECRET_NAME.search(node["name"]) or node["name"] == "RAY_AUTH_MODE", (
                    f"{label}: {node['name']} has a literal value"
                )
            if isinstance(node, dict) and SECRET_NAME.search(str(node.get("name", ""))):
                ref = (node.get("valueFrom") or {}).get("secretKeyRef")
                if "valueFrom" in node:
                    assert ref, f"{label}: {node['name']} not from a Secret"
    patterns = {
        "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
        "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        "secret assignment": (r"(?i)aws_secret_access_key\s*[=:]\s*[\"']?[A-Za-z0-9/+]{20,}"),
        "password in a URI": r"://[^:/\s\"']+:(?![$<{])[^@\s\"']+@",
    }
    for path in text_files():
        text = path.read_text()
        for what, pattern in patterns.items():
            match = re.search(pattern, text)
            assert not match, f"{path.relative_to(REPO)}: {what}: {match.group(0)[:40]}..."
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.strip().startswith(("ENV ", "ARG ")):
            assert not SECRET_NAME.search(line), f"Dockerfile bakes in a secret: {line}"


def test_kuberay_wiring() -> None:
    ((_, cluster),) = docs_of_kind("RayCluster")
    ((_, config_map),) = [
        (lbl, d) for lbl, d in docs_of_kind("ConfigMap") if d["metadata"]["name"] == "fmpipe-env"
    ]
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3"} <= set(config_map["data"])
    spec = cluster["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(head.get("resources")), "the head should be CPU"
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any(
            "nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {}) for c in containers(g)
        )
    ]
    assert gpu_groups, "no GPU worker group"
    for container in containers(spec):
        refs = {e["name"]: e.get("valueFrom", {}) for e in container.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in refs.get(name, {}), f"{container['name']}: {name}"
        assert {"configMapRef": {"name": "fmpipe-env"}} in container.get("envFrom", [])

    jobs = {lbl: d for lbl, d in docs_of_kind("RayJob") if "embedded" not in lbl}
    assert len(jobs) == 3
    for label, job in jobs.items():
        spec = job["spec"]
        assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), label

    ((_, cron),) = docs_of_kind("RayCronJob")
    assert re.fullmatch(r"\S+( \S+){4}", cron["spec"]["schedule"]), "not a 5-field cron"
    assert cron["spec"]["jobTemplate"]["entrypoint"].startswith("python -m jobs.retrain")


def test_cronjob_fallback_creates_a_rayjob() -> None:
    path = INFRA / "kuberay" / "cronjob-retrain-fallback.yaml"
    docs = {d["kind"]: d for d in load_docs(path)}
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"} <= set(docs)
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    command = " ".join(pod["containers"][0]["command"])
    assert command.startswith("kubectl create -f")
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert docs["ConfigMap"]["metadata"]["name"] in mounted
    (template,) = embedded_docs(docs["ConfigMap"])
    assert template["kind"] == "RayJob" and template["metadata"]["generateName"]
    rules = docs["Role"]["rules"]
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]


def test_mlflow_server_manifest() -> None:
    docs = {d["kind"]: d for d in load_docs(INFRA / "mlflow" / "mlflow.yaml")}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert args.startswith("server") and "--artifacts-destination=s3://" in args
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert docs["Service"]["spec"]["type"] == "ClusterIP"


# --------------------------------------------------------------------------- AWS


def test_aws_cluster_config_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    validate_config(config)  # raises on a schema error
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]
    assert head["InstanceType"] == "m5.2xlarge"
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(re.match(r"(g5|g6|p4d|p5)\.", w["node_config"]["InstanceType"]) for w in workers)
    for node_type in types.values():
        assert "IamInstanceProfile" in node_type["node_config"], "keys instead of a role?"
    version = ray_version()
    assert all(f"-ray{version}-" in config["docker"][k] for k in ("head_image", "worker_image"))
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in starts
    assert any("pip install" in c for c in config["setup_commands"])
