"""cluster/: the KubeRay manifests, the nightly CronJob and the image, checked without a cluster,
plus one real ``ray job submit`` of ``embedjob embed`` to a standalone Ray head.

The manifest tests cannot apply anything (no Kubernetes here), so they check each field name
against a table taken from KubeRay's API types and the Kubernetes API (see ``SCHEMA``), and
the cross-file facts a typo would break: versions, image tags, Secret references, Service name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SAMPLE = REPO / "embedjob" / "data" / "udhr_sample.parquet"

# --------------------------------------------------------------------------------------------
# Allowed fields, per type. A type maps each field to the type of its value: another type name,
# [type] for a list of that type, ANY (not looked into), STR (must be a string) or STRMAP
# (free keys, string values: Kubernetes/KubeRay map[string]string, where a YAML 0 or true is
# rejected by the API server).
#
# KubeRay (ray.io/v1), checked with the search tool against ray-project/kuberay:
#   ray-operator/apis/ray/v1/rayjob_types.go      RayJobSpec, SubmitterConfig (json tags)
#   ray-operator/apis/ray/v1/raycluster_types.go  RayClusterSpec, HeadGroupSpec, WorkerGroupSpec,
#                                                 AutoscalerOptions
#   docs/reference/api.md (generated CRD reference; adds WorkerGroupSpec.idleTimeoutSeconds and
#     .suspend, AutoscalerOptions.version, RayClusterSpec.managedBy/.gcsFaultToleranceOptions)
#   "KubeRay CRD API reference" on docs.ray.io (KubeRay 1.6/1.7) and the KubeRay v1.5.1 release
#     notes: RayClusterSpec.authOptions {mode: disabled | token}
#   ray-operator/controllers/ray/common/job.go    what the K8sJobMode submitter runs
# RayJobSpec.schedule is left out on purpose: scheduling is the CronJob's job here, and the
# cron-in-RayJob field was replaced by the separate RayCronJob CRD.
# Kubernetes: batch/v1 CronJobSpec/JobSpec and core/v1 PodSpec/Container/EnvVar/... (only the
# fields these manifests may reasonably use).
ANY, STR, STRMAP = "<any>", "<str>", "<map[string]string>"

SCHEMA: dict[str, dict[str, object]] = {
    # top level
    "RayJob": {"apiVersion": STR, "kind": STR, "metadata": "ObjectMeta", "spec": "RayJobSpec"},
    "RayCluster": {"apiVersion": STR, "kind": STR, "metadata": "ObjectMeta",
                   "spec": "RayClusterSpec"},
    "CronJob": {"apiVersion": STR, "kind": STR, "metadata": "ObjectMeta", "spec": "CronJobSpec"},
    "ObjectMeta": {"name": STR, "namespace": STR, "labels": STRMAP, "annotations": STRMAP},
    # KubeRay
    "RayJobSpec": {
        "activeDeadlineSeconds": ANY, "backoffLimit": ANY, "rayClusterSpec": "RayClusterSpec",
        "submitterPodTemplate": "PodTemplateSpec", "metadata": STRMAP, "clusterSelector": STRMAP,
        "submitterConfig": "SubmitterConfig", "managedBy": STR, "deletionStrategy": ANY,
        "entrypoint": STR, "runtimeEnvYAML": STR, "jobId": STR, "submissionMode": STR,
        "entrypointResources": STR, "entrypointNumCpus": ANY, "entrypointNumGpus": ANY,
        "ttlSecondsAfterFinished": ANY, "shutdownAfterJobFinishes": ANY, "suspend": ANY,
    },
    "SubmitterConfig": {"backoffLimit": ANY},
    "RayClusterSpec": {
        "headGroupSpec": "HeadGroupSpec", "workerGroupSpecs": ["WorkerGroupSpec"],
        "rayVersion": STR, "enableInTreeAutoscaling": ANY,
        "autoscalerOptions": "AutoscalerOptions", "headServiceAnnotations": STRMAP,
        "suspend": ANY, "managedBy": STR, "gcsFaultToleranceOptions": ANY,
        "authOptions": "AuthOptions",
    },
    "AuthOptions": {"mode": STR},
    "AutoscalerOptions": {
        "resources": "ResourceRequirements", "image": STR, "imagePullPolicy": STR,
        "securityContext": ANY, "idleTimeoutSeconds": ANY, "upscalingMode": STR, "version": STR,
        "env": ["EnvVar"], "envFrom": ANY, "volumeMounts": ["VolumeMount"],
    },
    "HeadGroupSpec": {"template": "PodTemplateSpec", "headService": ANY, "enableIngress": ANY,
                      "rayStartParams": STRMAP, "serviceType": STR},
    "WorkerGroupSpec": {
        "suspend": ANY, "groupName": STR, "replicas": ANY, "minReplicas": ANY,
        "maxReplicas": ANY, "idleTimeoutSeconds": ANY, "rayStartParams": STRMAP,
        "template": "PodTemplateSpec", "scaleStrategy": ANY, "numOfHosts": ANY,
    },
    # Kubernetes batch/v1
    "CronJobSpec": {
        "schedule": STR, "timeZone": STR, "concurrencyPolicy": STR,
        "startingDeadlineSeconds": ANY, "successfulJobsHistoryLimit": ANY,
        "failedJobsHistoryLimit": ANY, "suspend": ANY, "jobTemplate": "JobTemplateSpec",
    },
    "JobTemplateSpec": {"metadata": "ObjectMeta", "spec": "JobSpec"},
    "JobSpec": {"backoffLimit": ANY, "activeDeadlineSeconds": ANY,
                "ttlSecondsAfterFinished": ANY, "template": "PodTemplateSpec",
                "parallelism": ANY, "completions": ANY, "podFailurePolicy": ANY},
    # Kubernetes core/v1
    "PodTemplateSpec": {"metadata": "ObjectMeta", "spec": "PodSpec"},
    "PodSpec": {
        "containers": ["Container"], "initContainers": ["Container"], "volumes": ["Volume"],
        "nodeSelector": STRMAP, "tolerations": ["Toleration"], "affinity": ANY,
        "restartPolicy": STR, "serviceAccountName": STR, "terminationGracePeriodSeconds": ANY,
        "imagePullSecrets": ANY, "securityContext": ANY, "priorityClassName": STR,
    },
    "Container": {
        "name": STR, "image": STR, "imagePullPolicy": STR, "command": [STR], "args": [STR],
        "env": ["EnvVar"], "envFrom": ANY, "ports": ["ContainerPort"],
        "resources": "ResourceRequirements", "volumeMounts": ["VolumeMount"], "lifecycle": ANY,
        "securityContext": ANY, "workingDir": STR, "readinessProbe": ANY, "livenessProbe": ANY,
    },
    "EnvVar": {"name": STR, "value": STR, "valueFrom": "EnvVarSource"},
    "EnvVarSource": {"secretKeyRef": "KeySelector", "configMapKeyRef": "KeySelector",
                     "fieldRef": ANY, "resourceFieldRef": ANY},
    "KeySelector": {"name": STR, "key": STR, "optional": ANY},
    "ContainerPort": {"containerPort": ANY, "name": STR, "protocol": STR},
    "ResourceRequirements": {"requests": ANY, "limits": ANY},
    "VolumeMount": {"name": STR, "mountPath": STR, "readOnly": ANY, "subPath": STR},
    "Volume": {"name": STR, "emptyDir": "EmptyDirVolumeSource", "persistentVolumeClaim": ANY,
               "secret": ANY, "configMap": ANY},
    "EmptyDirVolumeSource": {"medium": STR, "sizeLimit": ANY},
    "Toleration": {"key": STR, "operator": STR, "value": STR, "effect": STR,
                   "tolerationSeconds": ANY},
}
API_VERSIONS = {"RayJob": "ray.io/v1", "RayCluster": "ray.io/v1", "CronJob": "batch/v1"}
# Env vars that must come from a Secret (valueFrom.secretKeyRef), never a literal value.
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "RAY_AUTH_TOKEN", "HF_TOKEN"}


def _problems(node: object, kind: object, path: str) -> list[str]:
    """Every field of ``node`` that ``SCHEMA`` does not allow for ``kind``, and bad value types."""
    if kind == ANY:
        return []
    if kind == STR:
        return [] if isinstance(node, str) else [f"{path}: expected a string, got {node!r}"]
    if kind == STRMAP:
        if node is None:
            return []
        if not isinstance(node, dict):
            return [f"{path}: expected a mapping"]
        return [f"{path}.{k}: value must be a string (quote it), got {v!r}"
                for k, v in node.items() if not isinstance(v, str)]
    if isinstance(kind, list):
        if not isinstance(node, list):
            return [f"{path}: expected a list"]
        return [p for i, item in enumerate(node) for p in _problems(item, kind[0], f"{path}[{i}]")]
    fields = SCHEMA[kind]
    if not isinstance(node, dict):
        return [f"{path}: expected a {kind} mapping"]
    found = []
    for key, value in node.items():
        if key not in fields:
            found.append(f"{path}.{key}: not a field of {kind}")
        else:
            found += _problems(value, fields[key], f"{path}.{key}")
    return found


def _manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted([*CLUSTER.glob("*.yaml"), *CLUSTER.glob("*.yml")]):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def _one(kind: str) -> dict:
    found = [doc for _, doc in _manifests() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in cluster/, found {len(found)}"
    return found[0]


def _cluster_specs() -> dict[str, dict]:
    return {"RayJob": _one("RayJob")["spec"]["rayClusterSpec"],
            "RayCluster": _one("RayCluster")["spec"]}


def _containers(doc: dict) -> list[tuple[str, dict]]:
    """(role, container) for every container a manifest runs."""
    if doc["kind"] == "CronJob":
        pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return [("submitter", c) for c in pod["containers"]]
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    found = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec.get("workerGroupSpecs", []):
        found += [(group["groupName"], c) for c in group["template"]["spec"]["containers"]]
    return found


def _env_lists(doc: dict) -> list[tuple[str, list]]:
    lists = [(role, c.get("env") or []) for role, c in _containers(doc)]
    if doc["kind"] != "CronJob":
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        lists.append(("autoscaler", (spec.get("autoscalerOptions") or {}).get("env") or []))
    return lists


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def _quantity(value: object) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _worker_group(spec: dict) -> dict:
    groups = spec["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["gpu-workers"]
    return groups[0]


# ------------------------------------------------------------------------------ manifests ---


@pytest.mark.unit
def test_every_manifest_parses_and_uses_only_known_fields():
    docs = _manifests()
    assert sorted(doc["kind"] for _, doc in docs) == ["CronJob", "RayCluster", "RayJob"]
    problems = []
    for name, doc in docs:
        kind = doc.get("kind")
        assert kind in SCHEMA, f"{name}: no field table for kind {kind!r}; add one"
        assert doc.get("apiVersion") == API_VERSIONS[kind], name
        problems += _problems(doc, kind, f"{name}:{kind}")
    assert not problems, "\n".join(problems)


@pytest.mark.unit
def test_field_check_reports_typos_and_unquoted_map_values():
    doc = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text(encoding="utf-8"))
    doc["spec"]["shutdownAfterJobFinish"] = True  # typo of shutdownAfterJobFinishes
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["nodeSelectors"] = {}
    found = _problems(doc, "RayJob", "x")
    assert "x.spec.shutdownAfterJobFinish: not a field of RayJobSpec" in found
    assert any("rayStartParams.num-cpus: value must be a string" in p for p in found)
    assert any(p.endswith("nodeSelectors: not a field of PodSpec") for p in found)


@pytest.mark.unit
def test_rayjob_is_a_one_off_that_cleans_up_after_itself():
    spec = _one("RayJob")["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert spec["entrypoint"].split()[:2] == ["embedjob", "embed"]
    if "runtimeEnvYAML" in spec:  # optional; when present it must be valid YAML with content
        assert yaml.safe_load(spec["runtimeEnvYAML"])


@pytest.mark.unit
def test_rayjob_entrypoint_parses_with_the_real_cli_and_fits_the_gpu_group(monkeypatch):
    """The entrypoint goes through ``embedjob``'s own parser and config checks (run is faked)."""
    import embedjob.driver.run
    from embedjob.cli import main
    from embedjob.driver.run import Summary

    seen = []

    def fake_run(config, **_):
        seen.append(config)
        values = {f.name: 0 for f in dataclasses.fields(Summary)}
        values.update(output=config.output, rejected_output=config.output + ".rejected",
                      table_version=1, task=None, dims=[])
        return Summary(**values)

    monkeypatch.setattr(embedjob.driver.run, "run", fake_run)
    argv = shlex.split(_one("RayJob")["spec"]["entrypoint"])
    assert argv[0] == "embedjob"
    assert main(argv[1:]) == 0
    (cfg,) = seen
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    assert (cfg.actor_range, cfg.gpus_per_actor, cfg.cpus_per_actor) == ((2, 8), 1.0, 4.0)
    assert cfg.vector_dtype == "float16" and tuple(cfg.dims) == (1024, 256, 64)
    group = _worker_group(_one("RayJob")["spec"]["rayClusterSpec"])
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    gpus = group["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert cfg.max_actors * cfg.gpus_per_actor <= gpus
    assert cfg.cpus_per_actor < _quantity(limits["cpu"])  # CPUs left for read/tokenize/write


@pytest.mark.unit
def test_clusters_keep_work_off_the_head_and_autoscale_gpu_workers():
    import ray

    for name, spec in _cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["enableInTreeAutoscaling"] is True, name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", name
        for role, container in _containers({"kind": "RayCluster", "spec": spec}):
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], f"{name} {role}: requests=limits"
            if role == "head":
                assert "nvidia.com/gpu" not in resources["limits"], name
        group = _worker_group(spec)
        assert group["minReplicas"] == 0 and group["maxReplicas"] == 8, name
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
        pod = group["template"]["spec"]
        assert int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        assert pod["nodeSelector"] and pod["tolerations"], name
    assert _one("RayCluster")["spec"]["workerGroupSpecs"][0]["replicas"] == 0  # idle at 0 GPUs


def _embedjob_args(script: str) -> list[str]:
    """The ``embedjob`` command line inside a shell script or entrypoint."""
    words = shlex.split(script.replace("\\\n", " "))
    start = words.index("embedjob")
    end = next((i for i in range(start, len(words)) if words[i] in (";", "fi", "then")),
               len(words))
    return words[start:end]


def _actor_range(argv: list[str]) -> tuple[int, int]:
    from embedjob.config import EmbedConfig

    value = argv[argv.index("--num-actors") + 1]
    return EmbedConfig(input="i.parquet", output="o.lance", num_actors=value).actor_range


@pytest.mark.unit
def test_gpu_worker_groups_autoscale_over_the_encode_pool_range():
    """``--num-actors MIN:MAX`` (Ray Data's ActorPoolStrategy(min_size, max_size)) and the GPU
    worker group agree: MAX actors fit in maxReplicas pods, the RayJob starts with the pods MIN
    actors need, and the in-tree autoscaler adds the rest as the pool grows."""
    cron = _one("CronJob")
    (_, container), = _containers(cron)
    jobs = {
        "RayJob": (_embedjob_args(_one("RayJob")["spec"]["entrypoint"]),
                   _one("RayJob")["spec"]["rayClusterSpec"]),
        "CronJob": (_embedjob_args(container["args"][-1]), _one("RayCluster")["spec"]),
    }
    for name, (argv, spec) in jobs.items():
        low, high = _actor_range(argv)
        assert low < high, f"{name}: --num-actors {low}:{high} does not autoscale"
        gpus = float(argv[argv.index("--gpus-per-actor") + 1])
        assert spec["enableInTreeAutoscaling"] is True, name
        group = _worker_group(spec)
        per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"][
            "nvidia.com/gpu"])
        assert group["maxReplicas"] * per_pod == high * gpus, f"{name}: maxReplicas != MAX"
        assert group["minReplicas"] == 0, f"{name}: idle GPU pods are given back"
        if name == "RayJob":  # a one-off starts with MIN actors' pods
            assert group["replicas"] * per_pod == low * gpus, f"{name}: replicas != MIN"
        assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0, name


@pytest.mark.unit
def test_credentials_come_from_secrets_and_never_appear_literally():
    for name, doc in _manifests():
        for role, env in _env_lists(doc):
            for var in env:
                if var["name"] in SECRET_ENV:
                    assert "value" not in var, f"{name} {role}: {var['name']} has a literal value"
                    assert var["valueFrom"]["secretKeyRef"]["name"], f"{name} {role}"
        text = (CLUSTER / name).read_text(encoding="utf-8")
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{name}: an AWS key id"
        assert "--storage-option" not in text, f"{name}: credentials belong in the env"
    for name, spec in _cluster_specs().items():
        for role, container in _containers({"kind": "RayCluster", "spec": spec}):
            env = _env(container)
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key, f"{name} {role}"
            assert isinstance(env["AWS_REGION"]["value"], str), f"{name} {role}"
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert env["HF_HOME"]["value"] in mounts, f"{name} {role}: HF_HOME on a volume"


@pytest.mark.unit
def test_token_auth_is_consistent_between_the_cluster_and_its_clients():
    cluster = _one("RayCluster")
    refs = set()
    for role, env in _env_lists(cluster):
        names = {v["name"]: v for v in env}
        assert names["RAY_AUTH_MODE"]["value"] == "token", role
        ref = names["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        refs.add((ref["name"], ref["key"]))
    (_, submitter), = _containers(_one("CronJob"))
    env = _env(submitter)
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert refs == {(ref["name"], ref["key"])}
    # The one-off RayJob lets KubeRay generate and distribute the token (submitter included).
    assert _one("RayJob")["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"


@pytest.mark.unit
def test_nightly_cronjob_waits_for_the_ray_job_and_never_overlaps():
    cron = _one("CronJob")
    spec = cron["spec"]
    assert spec["schedule"] == "0 2 * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    for key in ("startingDeadlineSeconds", "successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
        assert isinstance(spec[key], int) and spec[key] >= 0, key
    (_, container), = _containers(cron)
    script = container["command"][-1] if not container.get("args") else container["args"][-1]
    assert "ray job submit" in script and "--submission-id" in script
    assert "--no-wait" not in script  # Forbid only means something while the pod waits
    assert "nightly-$(date" in script
    # The address is the Service KubeRay creates for the long-lived cluster.
    expected = f"http://{_one('RayCluster')['metadata']['name']}-head-svc:8265"
    assert _env(container)["RAY_ADDRESS"]["value"] == expected
    proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.unit
def test_image_tags_and_versions_agree_across_files():
    import ray

    images = {c["image"] for _, doc in _manifests() for _, c in _containers(doc)}
    assert len(images) == 1, images
    (image,) = images
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert image.rsplit(":", 1)[1] == project["version"]
    lock = (REPO / "requirements.lock").read_text(encoding="utf-8").splitlines()
    assert f"ray=={ray.__version__}" in lock
    dockerfile = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", dockerfile, re.M)
    assert base and base.group(1).startswith(f"{ray.__version__}-py311-"), "Ray base image tag"
    index = re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/(cu\d+)$",
                      dockerfile, re.M)
    assert index and base.group(1).endswith(index.group(1)), "torch CUDA build = image CUDA"
    assert any(line.startswith("torch==") for line in lock)  # the Dockerfile reads it there
    copied = " ".join(re.findall(r"^COPY .*$", dockerfile, re.M))
    allowed = (CLUSTER / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    for path in ("embedjob/", "pyproject.toml", "requirements.lock", "README.md"):
        assert path in copied, path
        assert f"!{path}" in allowed, path


# ------------------------------------------------------------------ ray job submit (real) ---


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_head(session_id: int, marker: str) -> None:
    """Stop the Ray head this test started, and nothing else.

    ``ray stop`` would kill every Ray process on the machine, including the session-wide local
    Ray of the other tests (and anyone else's). Instead the head is started in a new session
    (``start_new_session=True``), so every daemon it forks (GCS, raylet, dashboard, workers)
    has that session id even after ``ray start`` exits and they are re-parented. Workers get
    their own process groups (so ``killpg`` would miss them) but keep the session. The job
    driver runs in a session of its own, as a child of the JobSupervisor worker, so the
    children of every process found are taken too; processes naming this head's unique temp
    dir are a last net. The test process and its ancestors are never touched.
    """
    import psutil

    spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            ours = os.getsid(proc.pid) == session_id or any(
                marker in part for part in proc.info["cmdline"] or [])
            if ours:
                found[proc.pid] = proc
                found.update((c.pid, c) for c in proc.children(recursive=True))
        except (OSError, psutil.Error):
            continue
    procs = [p for pid, p in found.items() if pid not in spared]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:  # gcs_server and raylet take their time on SIGTERM
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def _wait_for_dashboard(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
                json.load(response)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.slow
@pytest.mark.pipeline
def test_ray_job_submit_runs_embedjob_on_a_standalone_head(tmp_path, golden_dir):
    """What cluster/README.md tells users to do, on one machine: start a head, then
    ``ray job submit -- embedjob embed ...`` with the installed console script."""
    import lance

    bin_dir = str(Path(sys.executable).parent)
    path = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if shutil.which("embedjob", path=path) is None:
        pytest.fail("the embedjob console script is not installed: run ./dev setup "
                    "(pip install -e .)")
    # A fresh head without auth: Ray 2.60 reads RAY_AUTH_MODE from the environment of the head
    # and of the client alike, and this pytest process may carry RAY_AUTH_MODE=token from the
    # session's ray.init(), so both are set to disabled explicitly.
    env = {k: v for k, v in os.environ.items()
           if k not in {"RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}}
    env.update(PATH=path, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0")

    rows = pq.read_table(SAMPLE).slice(0, 5).column("text").to_pylist()
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": pa.array([101, 102, 103, 104, 105], pa.int64()),
                             "text": pa.array(rows, pa.string())}), corpus)
    out, summary = tmp_path / "out.lance", tmp_path / "summary.json"

    # Short temp dir: Ray's Unix socket paths must stay under ~107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="ejray-", dir="/tmp")
    dashboard = f"http://127.0.0.1:{_free_port()}"
    submission_id = f"test-{uuid.uuid4().hex[:10]}"
    head = subprocess.Popen(
        ["ray", "start", "--head", f"--port={_free_port()}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard.rsplit(':', 1)[1]}", "--include-dashboard=true",
         f"--temp-dir={ray_tmp}", f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}",
         "--min-worker-port=0", "--max-worker-port=0",
         f"--object-store-memory={256 * 1024 * 1024}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        started, _ = head.communicate(timeout=90)
        assert head.returncode == 0, started[-3000:]
        _wait_for_dashboard(dashboard)

        submit = subprocess.run(
            ["ray", "job", "submit", "--address", dashboard, "--submission-id", submission_id,
             "--", "embedjob", "embed", "--input", str(corpus), "--output", str(out),
             "--model", str(golden_dir), "--summary-json", str(summary)],
            env=env, capture_output=True, text=True, timeout=240,
        )
        logs = _strip_ansi(submit.stdout + submit.stderr)
        assert submit.returncode == 0, logs[-4000:]
        assert "embedded 5/5 rows" in logs  # the driver's output reached the client

        status = subprocess.run(["ray", "job", "status", "--address", dashboard, submission_id],
                                env=env, capture_output=True, text=True, timeout=60)
        assert f"Job '{submission_id}' succeeded" in _strip_ansi(status.stdout + status.stderr)

        assert lance.dataset(str(out)).count_rows() == 5
        assert json.loads(summary.read_text())["rows_embedded"] == 5
    finally:
        if head.poll() is None:
            head.kill()
        _kill_head(head.pid, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
