"""`shaper webhook`: a mutating admission webhook that adds the shaper sidecar to pods.

The Kubernetes API server POSTs an AdmissionReview (v1) for each pod being
created; the answer allows the pod and, when it should get a sidecar,
carries a JSONPatch adding it.  The MutatingWebhookConfiguration in deploy/
sends pods of namespaces labelled shaper-injection=enabled to /inject, and
pods of other namespaces annotated shaper.io/inject: "true" to
/inject/opt-in (its matchConditions only spare the webhook the calls: the
webhook checks the annotation itself).  The webhook then decides per pod:

- never in its own namespace or kube-system, only on CREATE of a Pod;
- never twice (the shaper.io/status annotation records an injection);
- shaper.io/inject: "false" opts a pod out; on /inject/opt-in only "true"
  opts it in.

Initial rules may be declared on the pod in the shaper.io/rules annotation
(the rules-file format), and whole-pod rates in kubelet's bandwidth
annotations (kubernetes.io/egress-bandwidth, kubernetes.io/ingress-bandwidth:
shaper.k8s.bandwidth).  The sidecar reads them through the downward API at
start; the webhook checks them too, and bad ones come back as admission
warnings (kubectl prints them) while the pod is still created: the sidecar
then starts without them and logs why, instead of crash-looping.

Everything here but `serve` is pure: AdmissionReview in, AdmissionReview out.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shaper.errors import InvalidInput
from shaper.http.api import Response, error, json_response
from shaper.http.client import DEFAULT_PORT
from shaper.k8s.bandwidth import ANNOTATIONS as BANDWIDTH_ANNOTATIONS
from shaper.k8s.bandwidth import FILES as BANDWIDTH_FILES

log = logging.getLogger("shaper")

INJECT_ANNOTATION = "shaper.io/inject"
STATUS_ANNOTATION = "shaper.io/status"
RULES_ANNOTATION = "shaper.io/rules"
IFACE_ANNOTATION = "shaper.io/interface"
INJECTED_LABEL = "shaper.io/injected"
CONTAINER = "shaper"
METRICS_PORT_NAME = "shaper-metrics"  # what the PodMonitor in deploy/ selects
PODINFO_DIR = "/etc/shaper/pod"
EXCLUDED_NAMESPACES = ("kube-system",)
INJECT_PATH = "/inject"  # pods of namespaces labelled shaper-injection=enabled
OPT_IN_PATH = "/inject/opt-in"  # pods elsewhere: only those annotated shaper.io/inject: "true"
INJECT_PATHS = (INJECT_PATH, OPT_IN_PATH)
MAX_WARNING = 120  # the API server's advice for warning length
MAX_REVIEW_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class SidecarConfig:
    """What the injected container looks like; set by `shaper webhook` options."""

    image: str
    namespace: str = "shaper-system"  # the webhook's own namespace: never injected
    native: bool = True  # an init container with restartPolicy: Always (Kubernetes >= 1.29)
    token_secret: str = "shaper-token"
    token_key: str = "token"
    interface: str = "eth0"
    port: int = DEFAULT_PORT
    pull_policy: str = "IfNotPresent"
    sys_admin: bool = False
    excluded: tuple[str, ...] = field(default=EXCLUDED_NAMESPACES)


# -- decisions ----------------------------------------------------------------------------------------------
def skip_reason(request: Mapping[str, Any], cfg: SidecarConfig, *, opt_in: bool = False) -> str | None:
    """Why this admission request gets no sidecar, or None if it gets one.

    opt_in: the pod is not in a namespace labelled for injection (the request came
    to /inject/opt-in) and gets a sidecar only if annotated shaper.io/inject: "true".
    The annotation values are compared exactly, as the configuration's CEL does."""
    if request.get("operation") != "CREATE":
        return f"operation {request.get('operation')}"
    kind = request.get("kind") or {}
    if kind.get("kind") != "Pod" or kind.get("group", "") != "":
        return f"kind {kind.get('kind')}"
    if request.get("subResource"):
        return f"subresource {request['subResource']}"
    namespace = request.get("namespace") or ""
    if namespace == cfg.namespace or namespace in cfg.excluded:
        return f"namespace {namespace} is excluded"
    pod = request.get("object") or {}
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    if annotations.get(STATUS_ANNOTATION):
        return "already injected"
    if annotations.get(INJECT_ANNOTATION) == "false":
        return f'{INJECT_ANNOTATION}: "false"'
    if opt_in and annotations.get(INJECT_ANNOTATION) != "true":
        return f'not in a labelled namespace and not annotated {INJECT_ANNOTATION}: "true"'

    spec = pod.get("spec") or {}
    if spec.get("hostNetwork"):
        return "hostNetwork pod: its interface is the node's"
    names = {c.get("name") for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])}
    if CONTAINER in names:
        return f"it already has a container named {CONTAINER}"
    return None


def rules_warnings(annotations: Mapping[str, Any]) -> list[str]:
    """The shaper.io/rules annotation checked as the sidecar will check it; [] when absent or valid."""
    from shaper.core.model import parse_ruleset_text

    text = annotations.get(RULES_ANNOTATION)
    if text is None:
        return []
    try:
        parse_ruleset_text(str(text), "rules", "it")
    except InvalidInput as exc:
        # Short enough for kubectl's one-line warning; the sidecar logs the whole reason.
        return [_warning(f"{RULES_ANNOTATION} ignored (no initial rules): {exc.field}: {exc.problem}"),
                ] + ([_warning(f"{RULES_ANNOTATION}: expected {exc.accepted}")] if exc.accepted else [])
    return []


def bandwidth_warnings(annotations: Mapping[str, Any]) -> list[str]:
    """kubelet's bandwidth annotations checked as the sidecar will check them (an empty value is no
    annotation, as the sidecar sees it), and a clash with a shaper.io/rules rule; [] when all is well."""
    from shaper.core.model import parse_ruleset_text
    from shaper.k8s.bandwidth import combine, from_annotations

    found = from_annotations(annotations)
    out = []
    for exc in found.errors:
        out.append(_warning(f"{exc.field} ignored: {exc.problem}"))
        if exc.accepted:
            out.append(_warning(f"{exc.field}: expected {exc.accepted}"))
    if found.rules and annotations.get(RULES_ANNOTATION) is not None:
        try:
            rules = parse_ruleset_text(str(annotations[RULES_ANNOTATION]), "rules", "it")
        except InvalidInput:
            rules = ()  # rules_warnings says why
        out += [_warning(problem) for problem in combine(rules, found.rules, source=RULES_ANNOTATION)[1]]
    return out


def _warning(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_WARNING else text[: MAX_WARNING - 3] + "..."


# -- what is added ------------------------------------------------------------------------------------------
def sidecar_container(cfg: SidecarConfig, interface: str) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/readyz", "port": METRICS_PORT_NAME}}
    # CAP_PERFMON: without it the verifier treats the program as unprivileged and
    # refuses its packet-pointer arithmetic (Spectre v1 hardening).
    caps = ["NET_ADMIN", "BPF", "PERFMON"] + (["SYS_ADMIN"] if cfg.sys_admin else [])
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": cfg.pull_policy,
        "args": ["run", "--iface", interface, "--listen", f":{cfg.port}",
                 "--pod-bandwidth", PODINFO_DIR, "--initial-rules", f"{PODINFO_DIR}/rules"],
        "env": [
            {"name": "SHAPER_TOKEN",
             "valueFrom": {"secretKeyRef": {"name": cfg.token_secret, "key": cfg.token_key}}},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        ],
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": cfg.port, "protocol": "TCP"}],
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 2},
        "resources": {
            # The BPF compile (a child process holding LLVM) peaks near 160 MB for
            # about a second; the daemon then stays under 60 MB.
            "requests": {"cpu": "20m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": {
            # root with three capabilities: tc needs CAP_NET_ADMIN, loading the
            # classifier CAP_BPF and CAP_PERFMON.
            # Runtime-default seccomp profiles refuse bpf() without CAP_SYS_ADMIN,
            # so this container (only) runs unconfined.
            "runAsUser": 0,
            "runAsNonRoot": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": caps},
            "seccompProfile": {"type": "Unconfined"},
        },
        "volumeMounts": [
            {"name": "shaper-modules", "mountPath": "/lib/modules", "readOnly": True},
            {"name": "shaper-src", "mountPath": "/usr/src", "readOnly": True},
            {"name": "shaper-bpffs", "mountPath": "/sys/fs/bpf"},
            {"name": "shaper-podinfo", "mountPath": PODINFO_DIR, "readOnly": True},
            {"name": "shaper-tmp", "mountPath": "/tmp"},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if not cfg.sys_admin:
        container["securityContext"]["allowPrivilegeEscalation"] = False
    if cfg.native:
        # A native sidecar: started, and ready, before the app's containers start;
        # stopped after them.
        container["restartPolicy"] = "Always"
        container["startupProbe"] = {**probe, "periodSeconds": 1, "failureThreshold": 120}
    return container


def sidecar_volumes() -> list[dict[str, Any]]:
    return [
        # No hostPath type for the headers: a node without them should start the
        # sidecar, which then says what is missing, rather than fail the mount.
        {"name": "shaper-modules", "hostPath": {"path": "/lib/modules"}},
        {"name": "shaper-src", "hostPath": {"path": "/usr/src"}},
        {"name": "shaper-bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "Directory"}},
        {"name": "shaper-podinfo", "downwardAPI": {"items": [
            {"path": "rules", "fieldRef": {"fieldPath": f"metadata.annotations['{RULES_ANNOTATION}']"}},
            # An absent annotation is an empty file: no limit.
            *({"path": BANDWIDTH_FILES[d], "fieldRef": {"fieldPath": f"metadata.annotations['{a}']"}}
              for d, a in BANDWIDTH_ANNOTATIONS.items()),
        ]}},
        {"name": "shaper-tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def injection_patch(pod: Mapping[str, Any], cfg: SidecarConfig) -> list[dict[str, Any]]:
    """The JSONPatch (RFC 6902) that adds the sidecar, its volumes and the status annotation."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations = meta.get("annotations") or {}
    interface = str(annotations.get(IFACE_ANNOTATION) or cfg.interface)
    ops: list[dict[str, Any]] = []
    container = sidecar_container(cfg, interface)
    if cfg.native:
        if spec.get("initContainers"):
            ops.append({"op": "add", "path": "/spec/initContainers/0", "value": container})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [container]})
    else:
        ops.append({"op": "add", "path": "/spec/containers/-", "value": container})
    taken = {v.get("name") for v in spec.get("volumes") or []}
    volumes = [v for v in sidecar_volumes() if v["name"] not in taken]
    if "volumes" in spec and spec["volumes"] is not None:
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes]
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    status = json.dumps({"container": CONTAINER, "image": cfg.image, "native": cfg.native}, sort_keys=True)
    for where, key, value in (("annotations", STATUS_ANNOTATION, status), ("labels", INJECTED_LABEL, "true")):
        if meta.get(where) is None:
            ops.append({"op": "add", "path": f"/metadata/{where}", "value": {key: value}})
        else:
            ops.append({"op": "add", "path": f"/metadata/{where}/{_pointer(key)}", "value": value})
    return ops


def review(body: Mapping[str, Any], cfg: SidecarConfig, *, opt_in: bool = False) -> dict[str, Any]:
    """Answer one AdmissionReview: always allowed, with a patch when the pod gets a sidecar."""
    if body.get("apiVersion") != "admission.k8s.io/v1" or body.get("kind") != "AdmissionReview":
        raise InvalidInput("apiVersion/kind", "not an AdmissionReview", "admission.k8s.io/v1 AdmissionReview")
    request = body.get("request")
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str):
        raise InvalidInput("request.uid", "missing", "an AdmissionReview request with a uid")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    pod = request.get("object")
    where = f"{request.get('namespace') or '-'}/{_pod_name(pod)}"
    if isinstance(pod, Mapping):
        _check_pod_shape(pod)
    reason = skip_reason(request, cfg, opt_in=opt_in) if isinstance(pod, Mapping) else "no object"
    if reason is None:
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        warnings = rules_warnings(annotations) + bandwidth_warnings(annotations)
        patch = injection_patch(pod, cfg)
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        if warnings:
            response["warnings"] = warnings
            # One line a log shipper can turn into an event on the pod.
            log.warning("inject.rules_invalid", extra={"fields": {"pod": where, "reason": warnings[0]}})
        log.info("inject", extra={"fields": {"pod": where, "native": cfg.native, "dry_run": bool(request.get("dryRun"))}})
    else:
        log.debug("inject.skip", extra={"fields": {"pod": where, "reason": reason}})
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def _check_pod_shape(pod: Mapping[str, Any]) -> None:
    """The parts the patch is built from have the types a Pod has (the API server sends
    them so; anything else is not a pod the patch would apply to)."""
    meta, spec = pod.get("metadata", {}), pod.get("spec")
    checks = [("object.metadata", meta, Mapping), ("object.spec", spec, Mapping)]
    if isinstance(meta, Mapping):
        checks += [(f"object.metadata.{k}", meta[k], Mapping) for k in ("annotations", "labels") if meta.get(k) is not None]
    if isinstance(spec, Mapping):
        checks += [(f"object.spec.{k}", spec[k], list) for k in ("containers", "initContainers", "volumes")
                   if spec.get(k) is not None]
        if not spec.get("containers"):
            raise InvalidInput("object.spec.containers", "missing", "a Pod with containers")
    for where, value, kind in checks:
        if not isinstance(value, kind):
            raise InvalidInput(where, f"is a {type(value).__name__}", "the type a Pod has there")


def _pod_name(pod: Any) -> str:
    meta = (pod.get("metadata") or {}) if isinstance(pod, Mapping) else {}
    return str(meta.get("name") or (meta.get("generateName") or "?") + "*")


# -- HTTP ---------------------------------------------------------------------------------------------------
class WebhookApp:
    """The webhook's routes, in the shape server.make_server takes (handle -> Response)."""

    def __init__(self, cfg: SidecarConfig):
        self.cfg = cfg

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes,
               client: str = "") -> Response:
        path = target.split("?", 1)[0]
        if path in ("/healthz", "/readyz"):
            return json_response(200, {"status": "ok"}) if method in ("GET", "HEAD") else \
                error(405, f"{method} not allowed", headers={"Allow": "GET, HEAD"})
        if path not in INJECT_PATHS:
            return error(404, f"no such path {path[:100]!r}: the webhook serves POST {' and '.join(INJECT_PATHS)}")
        if method != "POST":
            return error(405, f"{method} not allowed on {path}", headers={"Allow": "POST"})
        if len(body) > MAX_REVIEW_BYTES:
            return error(413, "AdmissionReview too large")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return error(400, "body is not JSON")
        if not isinstance(data, Mapping):
            return error(400, "body is not a JSON object")
        try:
            return json_response(200, review(data, self.cfg, opt_in=path == OPT_IN_PATH))
        except InvalidInput as exc:
            return error(400, str(exc))
        except (AttributeError, TypeError, ValueError) as exc:  # a field of the wrong JSON type
            log.warning("inject.malformed", extra={"fields": {"error": str(exc)[:200]}})
            return error(400, "malformed AdmissionReview: a field has the wrong type")


class CertificateFiles:
    """A TLS server context that follows certificate rotation (cert-manager, the script): reloaded
    when the files change (two stat() calls per new connection)."""

    def __init__(self, cert: str, key: str):
        self.cert, self.key = cert, key
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._context: ssl.SSLContext | None = None
        self._problem: str | None = None
        self.context()  # fail now, not at the first request

    def _files_stamp(self) -> tuple:
        return tuple((os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in (self.cert, self.key))

    def context(self) -> ssl.SSLContext:
        with self._lock:
            try:
                stamp = self._files_stamp()
            except OSError as exc:
                if self._context is None:
                    raise InvalidInput("--tls-cert", f"cannot read {exc.filename}: {exc.strerror}",
                                       "PEM certificate and key files") from None
                return self._keep(exc)  # mid-rotation, or unreadable: keep serving with what we have
            if stamp != self._stamp:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                try:
                    ctx.load_cert_chain(self.cert, self.key)
                except (ssl.SSLError, OSError) as exc:
                    if self._context is None:
                        raise InvalidInput("--tls-cert", f"cannot load {self.cert} / {self.key}: {exc}",
                                           "a PEM certificate and its private key") from None
                    return self._keep(exc)
                if self._context is not None:
                    log.info("tls.reloaded", extra={"fields": {"cert": self.cert}})
                self._context, self._stamp, self._problem = ctx, stamp, None
            return self._context

    def _keep(self, exc: Exception) -> ssl.SSLContext:
        """Serve the certificate loaded before; say why once per problem, not once per connection."""
        if self._problem != str(exc):
            self._problem = str(exc)
            log.warning("tls.reload_failed", extra={"fields": {"error": str(exc),
                                                               "action": "serving the previous certificate"}})
        assert self._context is not None
        return self._context


def serve(cfg: SidecarConfig, listen: str, cert: str, key: str, *, tls_handshake_s: float | None = None) -> None:
    """Serve /inject over HTTPS until SIGTERM/SIGINT, on the daemon's HTTP stack (server.py):
    the same header deadline, strict parsing and body bounds, and a connection whose TLS
    handshake is not done within `tls_handshake_s` (server.TLS_HANDSHAKE_S) closed; a
    certificate rotated on disk is picked up by the next handshake."""
    import signal

    from shaper.http.server import TLS_HANDSHAKE_S, make_server, parse_listen

    host, port = parse_listen(listen)
    tls = CertificateFiles(cert, key)
    httpd = make_server(host, port, WebhookApp(cfg), tls=tls, max_body=MAX_REVIEW_BYTES, name="https",
                        tls_handshake_s=TLS_HANDSHAKE_S if tls_handshake_s is None else tls_handshake_s)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    httpd.start()
    bound = httpd.server_address
    log.info("webhook.listen", extra={"fields": {"address": f"{bound[0]}:{bound[1]}", "image": cfg.image,
                                                 "native": cfg.native, "namespace": cfg.namespace}})
    try:
        stop.wait()
    finally:
        httpd.stop()
        httpd.app.kernel.close()
        log.info("webhook.stop", extra={"fields": {}})
