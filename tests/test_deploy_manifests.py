"""deploy/k8s/: the Deployment, Service and KServe InferenceService validated against Kubernetes' own schemas
(kubernetes-validate, strict: no unknown field), and held to what the image and the server are: the probes on
health routes that need no API key, the arguments the server's command line accepts, the image's non-root user."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.30"  # the oldest release still supported upstream when these were written
# KServe's ComponentExtensionSpec keys, inline beside the PodSpec in an InferenceService's predictor
KSERVE_PREDICTOR_KEYS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency",
                         "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
                         "deploymentStrategy", "model"}

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev install")


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def pod_specs() -> list[dict]:
    deployment = next(d for d in documents("deployment.yaml") if d["kind"] == "Deployment")
    predictor = documents("inferenceservice.yaml")[0]["spec"]["predictor"]
    return [deployment["spec"]["template"]["spec"],
            {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_KEYS}]


def test_every_manifest_is_valid_for_kubernetes():
    for doc in documents("deployment.yaml"):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    service = documents("inferenceservice.yaml")[0]
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    # KServe's predictor is a PodSpec with KServe's own keys beside it (its CRD is not on PyPI): the PodSpec part
    # against Kubernetes' schema, strictly
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
                                  "spec": pod_specs()[1]}, KUBERNETES, strict=True)


def test_the_validator_refuses_a_broken_manifest():
    broken = documents("deployment.yaml")[0]
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}  # a misspelled key
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_pods_run_what_the_image_and_the_server_are():
    from kdforge.serve.__main__ import argument_parser
    from kdforge.serve.app import HEALTH_ROUTES

    uid = int(re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    for spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == uid
        (container,) = spec["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
        # the image's ENTRYPOINT is `python -m kdforge.serve /models`; the manifest's args follow it
        args = argument_parser().parse_args(["/models", *container.get("args", [])])
        env = {item["name"]: item["value"] for item in container.get("env", [])}
        port = int(env.get("KDFORGE_PORT", args.port)) if "--port" not in container.get("args", []) else args.port
        assert [p["containerPort"] for p in container["ports"]] == [port]
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["path"] in HEALTH_ROUTES  # open without the API key
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # uploads spill there
