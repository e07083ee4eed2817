"""deploy/kubernetes: the manifests validate offline against the Kubernetes schemas (kubernetes-validate) and say
what the service needs (probes, grace period, resources, non-root, read-only root, GPU scheduling).

The Kustomize renderings come from ``kubectl kustomize`` (kubectl's built-in Kustomize) when kubectl is on PATH;
without it those tests skip and the base files are still validated one by one. The KubeRay ``RayJob`` is a custom
resource whose schema ships with the operator, not with Kubernetes: its structure is checked here (the fields
KubeRay requires), its pod templates are validated as Kubernetes ``PodTemplate`` objects, and its entrypoint is
parsed by facerecon's own command line.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
#: The oldest Kubernetes we claim (every API used is GA there) and the newest kubernetes-validate knows.
VERSIONS = ("1.30.0", kv.utils.latest_version())
KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def _validate(doc: dict[str, Any]) -> None:
    for version in VERSIONS:
        kv.validate(doc, version, strict=True)  # raises ValidationError: unknown fields too (strict)


def _kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not on PATH: the renderings are not checked")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), "one object per kind"
    return kinds


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_base_files_validate_one_by_one() -> None:
    """Without kustomize: every resource the base lists is a valid object on its own."""
    kustomization = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    seen = set()
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / "base" / name).read_text()):
            _validate(doc)
            seen.add(doc["kind"])
    assert seen == KINDS


def test_invalid_manifests_are_caught() -> None:
    """The validator is not a no-op: a typo'd field and a wrong type fail."""
    dep = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kv.utils.ValidationError):
        _validate(dep)
    dep = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kv.utils.ValidationError):
        _validate(dep)


def _check_service(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """What both renderings must hold; returns the container for overlay-specific checks."""
    for d in docs:
        _validate(d)
    k = _by_kind(docs)
    assert set(k) == KINDS
    dep, svc, hpa, pdb = k["Deployment"], k["Service"], k["HorizontalPodAutoscaler"], k["PodDisruptionBudget"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for selector in (dep["spec"]["selector"]["matchLabels"], svc["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items(), "selectors must match the pods"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], "a drain must be able to evict a pod"
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    env = _env(c)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert int(env["FACERECON_PORT"]) == ports[c["readinessProbe"]["httpGet"]["port"]] == 8000
    # SIGTERM arrives after the preStop pause; the server then drains for FACERECON_GRACEFUL_TIMEOUT_S; the kubelet
    # must not kill it before that.
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert float(env["FACERECON_GRACEFUL_TIMEOUT_S"]) == 30
    assert pause + float(env["FACERECON_GRACEFUL_TIMEOUT_S"]) < grace <= pause + 30 + 15
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True and pod["spec"]["securityContext"]["runAsUser"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert any(env["NUMBA_CACHE_DIR"].startswith(m) for m in mounts), "numba's cache must be writable"
    return c


def test_base_renders_to_a_valid_cpu_service() -> None:
    docs = _kustomize(DEPLOY / "base")
    c = _check_service(docs)
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert c["image"] == "facerecon:cpu"


def test_gpu_overlay_schedules_on_gpus() -> None:
    docs = _kustomize(DEPLOY / "overlays" / "gpu")
    c = _check_service(docs)
    pod = _by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    assert c["image"] == "facerecon:gpu"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    env = _env(c)
    assert env["FACERECON_DEVICE"] == "cuda"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert env["TORCH_EXTENSIONS_DIR"] in mounts, "nvdiffrast's plugin folder must be writable (torch's loader)"
    # the plugin compiled into the image is copied onto that volume before the server starts
    init = {i["name"]: i for i in pod["initContainers"]}["nvdiffrast-plugin"]
    assert init["image"] == c["image"] == "facerecon:gpu"
    assert "/app/.torch_extensions/." in " ".join(init["command"])
    assert {m["name"] for m in init["volumeMounts"]} == {mounts[env["TORCH_EXTENSIONS_DIR"]]}
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert sum(1 for e in c["env"] if e["name"] == "FACERECON_WORKERS") == 1, "the patch replaces, not appends"


def test_rayjob_structure_pods_and_entrypoint() -> None:
    job = yaml.safe_load((DEPLOY / "ray" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert spec["entrypoint"].strip() and spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and isinstance(spec["activeDeadlineSeconds"], int)
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    assert isinstance(head["rayStartParams"], dict) and groups
    templates = [head["template"]]
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        templates.append(g["template"])
    for t in templates:  # the pod templates are plain Kubernetes: validate them as such
        _validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t})
        for c in t["spec"]["containers"]:
            assert c["image"] == "facerecon:batch" and c["resources"]["limits"]["memory"]
    dockerfile = (DEPLOY / "ray" / "Dockerfile").read_text()
    assert f"ray[default,data]=={cluster['rayVersion']}" in dockerfile, "image Ray == rayVersion"

    from facerecon.cli import build_parser

    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "facerecon"
    args = build_parser().parse_args(argv[1:])  # SystemExit on any option the CLI does not know
    assert args.command == "batch" and args.engine == "ray" and args.address == "auto"
    assert args.out.startswith("s3://") and all(i.startswith("s3://") for i in args.inputs)
    cpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for g in groups)
    assert args.workers == cpus, "one actor per worker CPU"
