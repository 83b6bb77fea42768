"""Pods as the API server hands them to a mutating webhook (after defaulting), and the
AdmissionReview requests that carry them; shared by the unit and kernel webhook tests."""

from __future__ import annotations

import base64
import copy
import json
import uuid

import jsonpatch
import kubernetes_validate

# The oldest Kubernetes with native sidecars on by default (1.29) and the newest schema known.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _container(name: str, image: str, **extra) -> dict:
    return {
        "name": name, "image": image, "imagePullPolicy": "IfNotPresent", "resources": {},
        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
        "volumeMounts": [{"name": "kube-api-access-x1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                          "readOnly": True}],
        **extra,
    }


def _spec(containers: list[dict], **extra) -> dict:
    return {
        "containers": containers,
        "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default", "serviceAccount": "default", "securityContext": {},
        "schedulerName": "default-scheduler", "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0,
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                         "tolerationSeconds": 300}],
        "volumes": [{"name": "kube-api-access-x1", "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}],
        **extra,
    }


def deployment_pod(namespace: str = "shop", annotations: dict | None = None) -> dict:
    meta = {"generateName": "web-7c9f8d6b5-", "namespace": namespace,
            "labels": {"app": "web", "pod-template-hash": "7c9f8d6b5"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7c9f8d6b5",
                                 "uid": str(uuid.uuid4()), "controller": True, "blockOwnerDeletion": True}]}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": _spec([_container("web", "nginx:1.27", ports=[{"name": "http", "containerPort": 80,
                                                                    "protocol": "TCP"}])])}


def statefulset_pod(namespace: str = "shop", ordinal: int = 0, annotations: dict | None = None) -> dict:
    meta = {"name": f"db-{ordinal}", "generateName": "db-", "namespace": namespace,
            "labels": {"app": "db", "apps.kubernetes.io/pod-index": str(ordinal),
                       "controller-revision-hash": "db-5d4f7b9c8",
                       "statefulset.kubernetes.io/pod-name": f"db-{ordinal}"},
            "annotations": annotations or {"kubectl.kubernetes.io/default-container": "db"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db",
                                 "uid": str(uuid.uuid4()), "controller": True, "blockOwnerDeletion": True}]}
    spec = _spec([_container("db", "postgres:16", volumeMounts=[
        {"name": "data", "mountPath": "/var/lib/postgresql/data"},
        {"name": "kube-api-access-x1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}])],
        hostname=f"db-{ordinal}", subdomain="db")
    spec["volumes"].insert(0, {"name": "data", "persistentVolumeClaim": {"claimName": f"data-db-{ordinal}"}})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def pod_with_init_containers(namespace: str = "shop") -> dict:
    pod = deployment_pod(namespace)
    pod["spec"]["initContainers"] = [_container("migrate", "migrate:1", command=["migrate", "up"]),
                                     _container("wait-db", "busybox:1.36", command=["sh", "-c", "until nc -z db 5432; do sleep 1; done"])]
    return pod


def bare_pod(namespace: str = "shop") -> dict:
    """A pod with no volumes, labels or annotations at all (every list and map is created)."""
    pod = deployment_pod(namespace)
    del pod["metadata"]["labels"]
    pod["metadata"].pop("annotations", None)
    del pod["spec"]["volumes"]
    pod["spec"]["containers"][0]["volumeMounts"] = []
    return pod


def review(pod: dict, *, operation: str = "CREATE", namespace: str | None = None, kind: str = "Pod") -> dict:
    namespace = namespace or pod["metadata"].get("namespace", "default")
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"].get("name", ""), "namespace": namespace, "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod, "oldObject": pod if operation == "UPDATE" else None, "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def apply_response(pod: dict, response: dict) -> dict:
    """The pod after the API server applies the webhook's JSONPatch (unchanged when there is none)."""
    if "patch" not in response:
        assert "patchType" not in response
        return copy.deepcopy(pod)
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(pod, ops)


def validate_pod(pod: dict) -> None:
    """Against the Pod schema of every version in K8S_VERSIONS, rejecting unknown fields."""
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
