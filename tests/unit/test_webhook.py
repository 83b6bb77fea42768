"""The admission webhook's decisions and patches, pure (no sockets): AdmissionReview in, the pod
after its JSONPatch validated against the Kubernetes Pod schema."""

import base64
import json

import pytest

from shaper import cli
from shaper.core.model import parse_ruleset_text
from shaper.k8s import webhook as W
from shaper.k8s.bandwidth import bandwidth_rules
from tests.support import k8s_pods as K

CFG = W.SidecarConfig(image="registry.example/shaper:0.1.0")


def admit(pod: dict, cfg: W.SidecarConfig = CFG, opt_in: bool = False, **kw) -> tuple[dict, dict]:
    """(response, pod after the patch) for one CREATE request."""
    req = K.review(pod, **kw)
    out = W.review(req, cfg, opt_in=opt_in)
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    resp = out["response"]
    assert resp["uid"] == req["request"]["uid"] and resp["allowed"] is True
    return resp, K.apply_response(pod, resp)


def sidecar_of(pod: dict) -> dict:
    found = [c for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"] if c["name"] == "shaper"]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("make", [K.deployment_pod, K.statefulset_pod, K.pod_with_init_containers, K.bare_pod],
                         ids=["deployment", "statefulset", "init-containers", "bare"])
def test_injected_pod_is_valid_and_complete(make):
    pod = make()
    resp, patched = admit(pod)
    assert "warnings" not in resp
    K.validate_pod(patched)
    side = patched["spec"]["initContainers"][0]  # native sidecar: first, before the pod's own init containers
    assert side["name"] == "shaper" and side["restartPolicy"] == "Always"
    assert side["image"] == CFG.image
    # The pod's own containers and init containers are untouched and still in order.
    assert patched["spec"]["containers"] == pod["spec"]["containers"]
    assert patched["spec"]["initContainers"][1:] == pod["spec"].get("initContainers", [])
    # Every mount names a volume the pod now has; the pod's own volumes are kept.
    names = [v["name"] for v in patched["spec"]["volumes"]]
    assert len(names) == len(set(names))
    assert {m["name"] for m in side["volumeMounts"]} <= set(names)
    assert [v for v in patched["spec"]["volumes"] if not v["name"].startswith("shaper-")] == \
        pod["spec"].get("volumes", [])
    # The header mounts, the bpffs, the rules from the downward API.
    mounts = {m["mountPath"]: m for m in side["volumeMounts"]}
    assert mounts["/lib/modules"]["readOnly"] and mounts["/usr/src"]["readOnly"]
    vols = {v["name"]: v for v in patched["spec"]["volumes"]}
    assert vols[mounts["/sys/fs/bpf"]["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    assert vols[mounts["/lib/modules"]["name"]]["hostPath"]["path"] == "/lib/modules"
    podinfo = vols[mounts[W.PODINFO_DIR]["name"]]["downwardAPI"]["items"]
    assert podinfo[0]["fieldRef"]["fieldPath"] == "metadata.annotations['shaper.io/rules']"
    assert side["args"][-2:] == ["--initial-rules", f"{W.PODINFO_DIR}/{podinfo[0]['path']}"]
    # kubelet's bandwidth annotations, as files of the same directory for --pod-bandwidth.
    assert {i["path"]: i["fieldRef"]["fieldPath"] for i in podinfo[1:]} == {
        "egress-bandwidth": "metadata.annotations['kubernetes.io/egress-bandwidth']",
        "ingress-bandwidth": "metadata.annotations['kubernetes.io/ingress-bandwidth']",
    }
    assert side["args"][-4:-2] == ["--pod-bandwidth", W.PODINFO_DIR]
    # Token from the Secret, probes on the named port, least privilege.
    env = {e["name"]: e for e in side["env"]}
    assert env["SHAPER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "shaper-token", "key": "token"}
    assert side["ports"] == [{"name": "shaper-metrics", "containerPort": 2332, "protocol": "TCP"}]
    assert side["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "shaper-metrics"}
    assert side["startupProbe"]["httpGet"]["path"] == "/readyz"
    sc = side["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "BPF", "PERFMON"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert "privileged" not in sc
    # Recorded, and labelled for the PodMonitor.
    status = json.loads(patched["metadata"]["annotations"][W.STATUS_ANNOTATION])
    assert status == {"container": "shaper", "image": CFG.image, "native": True}
    assert patched["metadata"]["labels"][W.INJECTED_LABEL] == "true"
    # Everything the pod had in its metadata is still there.
    for where in ("labels", "annotations"):
        assert pod["metadata"].get(where, {}).items() <= patched["metadata"][where].items()


def test_the_sidecar_command_line_is_one_shaper_run_accepts():
    side = W.sidecar_container(CFG, "eth0")
    ctx = cli.main.commands[side["args"][0]].make_context(side["args"][0], list(side["args"][1:]))
    assert ctx.params["iface"] == "eth0" and ctx.params["listen"] == ":2332"
    assert ctx.params["initial_rules_file"] == "/etc/shaper/pod/rules"
    assert ctx.params["pod_bandwidth_dir"] == "/etc/shaper/pod"


def test_ordinary_container_mode_and_options():
    cfg = W.SidecarConfig(image="shaper:1", native=False, token_secret="tok", token_key="k", port=9000,
                          sys_admin=True)
    pod = K.statefulset_pod(annotations={"shaper.io/interface": "net1", "team/owner": "db"})
    _, patched = admit(pod, cfg)
    K.validate_pod(patched)
    assert "initContainers" not in patched["spec"]
    side = patched["spec"]["containers"][-1]
    assert side["name"] == "shaper" and "restartPolicy" not in side and "startupProbe" not in side
    assert side["args"][:5] == ["run", "--iface", "net1", "--listen", ":9000"]
    assert side["ports"][0]["containerPort"] == 9000
    assert side["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "tok", "key": "k"}
    # SYS_ADMIN and allowPrivilegeEscalation: false cannot go together (the API server refuses it).
    assert "SYS_ADMIN" in side["securityContext"]["capabilities"]["add"]
    assert "allowPrivilegeEscalation" not in side["securityContext"]
    assert patched["metadata"]["annotations"]["team/owner"] == "db"


@pytest.mark.parametrize("pod, kw, why", [
    (K.deployment_pod(annotations={"shaper.io/inject": "false"}), {}, "opted out"),
    (K.deployment_pod("other"), {"opt_in": True}, "elsewhere, not annotated"),
    (K.deployment_pod("other", annotations={"shaper.io/inject": "True"}), {"opt_in": True},
     "elsewhere, annotated with another value than exactly \"true\" (as the configuration's CEL compares)"),
    (K.deployment_pod("other", annotations={"shaper.io/inject": "false"}), {"opt_in": True}, "elsewhere, opted out"),
    (K.deployment_pod("kube-system"), {}, "kube-system"),
    (K.deployment_pod("shaper-system"), {}, "the webhook's own namespace"),
    (K.deployment_pod(), {"operation": "UPDATE"}, "not a CREATE"),
    (K.deployment_pod(), {"kind": "Deployment"}, "not a pod"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_pods_left_alone(pod, kw, why):
    resp, patched = admit(pod, **kw)
    assert "patch" not in resp and patched == pod, why


def test_never_injected_twice():
    _, once = admit(K.statefulset_pod())
    resp, twice = admit(once)
    assert "patch" not in resp and twice == once
    # A pod that already has a container named shaper (put there by hand) is left alone too.
    pod = K.deployment_pod()
    pod["spec"]["containers"].append(dict(pod["spec"]["containers"][0], name="shaper"))
    assert "patch" not in admit(pod)[0]


def test_host_network_pods_are_left_alone():
    pod = K.deployment_pod()
    pod["spec"]["hostNetwork"] = True
    assert "patch" not in admit(pod)[0]


def test_opt_in_annotation_and_rules_annotation():
    rules = "rules:\n  - name: db\n    dst: [10.244.1.0/24]\n    delay: 50ms\n"
    resp, patched = admit(K.deployment_pod("other", annotations={"shaper.io/inject": "true", "shaper.io/rules": rules}),
                          opt_in=True)
    assert "warnings" not in resp
    K.validate_pod(patched)
    # The annotation reaches the sidecar unchanged (downward API), in the rules-file format.
    assert parse_ruleset_text(patched["metadata"]["annotations"]["shaper.io/rules"], "x", "x")[0].delay_us == 50_000


@pytest.mark.parametrize("rules, field", [
    ("rules:\n  - name: db\n    dst: [10.244.1.0/24]\n    delay: 50 parsecs\n", "delay"),
    ("rules: [", "not valid YAML"),
    ("- just a list", "expected a mapping"),
    ("rules:\n  - name: a\n    dst: [10.0.0.0/8]\n    jitter: " + "9" * 500 + "ms\n", "jitter"),
])
def test_bad_rules_are_a_warning_not_a_refusal(rules, field, caplog):
    with caplog.at_level("WARNING", logger="shaper"):
        resp, patched = admit(K.deployment_pod(annotations={"shaper.io/rules": rules}))
    assert resp["allowed"] is True and "patch" in resp  # still injected: the sidecar starts with no rules
    K.validate_pod(patched)
    warning = resp["warnings"][0]
    assert warning.startswith("shaper.io/rules ignored") and field in warning
    assert all(len(w) <= W.MAX_WARNING for w in resp["warnings"])
    assert any(r.getMessage() == "inject.rules_invalid" for r in caplog.records)


def test_bandwidth_annotations_without_warnings():
    pod = K.deployment_pod(annotations={"kubernetes.io/egress-bandwidth": "10M",
                                        "kubernetes.io/ingress-bandwidth": "1Gi",
                                        "shaper.io/rules": "rules: [{name: db, dst: [10.0.0.0/8], delay: 5ms}]"})
    resp, patched = admit(pod)
    assert "warnings" not in resp and "patch" in resp
    K.validate_pod(patched)


@pytest.mark.parametrize("annotation, value, reason", [
    ("kubernetes.io/egress-bandwidth", "10Mbit", "'10Mbit' is not a quantity: quantities must match"),
    ("kubernetes.io/ingress-bandwidth", "10K", "'10K': unable to parse quantity's suffix 'K'"),
    ("kubernetes.io/ingress-bandwidth", "500", "'500' is 500 bit/s: resource is unreasonably small (< 1kbit)"),
    ("kubernetes.io/egress-bandwidth", "2P", "'2P' is 2e+15 bit/s: resource is unreasonably large (> 1Pbit)"),
    ("kubernetes.io/egress-bandwidth", "5k", "'5k' is 5kbit/s: kubelet takes it, but shaper's rates go from 8kbit"),
])
def test_a_bad_bandwidth_annotation_is_a_warning_as_the_sidecar_refuses_it(annotation, value, reason, caplog):
    with caplog.at_level("WARNING", logger="shaper"):
        resp, patched = admit(K.deployment_pod(annotations={annotation: value}))
    assert resp["allowed"] is True and "patch" in resp  # still injected: the sidecar starts without the limit
    K.validate_pod(patched)
    assert resp["warnings"][0].startswith(f"{annotation} ignored: {reason}")
    assert resp["warnings"][1].startswith(f"{annotation}: expected ")
    assert all(len(w) <= W.MAX_WARNING for w in resp["warnings"])
    assert any(r.getMessage() == "inject.rules_invalid" for r in caplog.records)
    # The same words as the sidecar's: both read the value with shaper.k8s.bandwidth.
    found = bandwidth_rules({"egress" if "egress" in annotation else "ingress": value})
    assert resp["warnings"][0] == W._warning(f"{annotation} ignored: {found.errors[0].problem}")


def test_an_empty_bandwidth_annotation_is_none_as_the_sidecar_sees_it():
    resp, _ = admit(K.deployment_pod(annotations={"kubernetes.io/egress-bandwidth": ""}))
    assert "warnings" not in resp


def test_a_bandwidth_annotation_clashing_with_shaper_io_rules_is_a_warning():
    rules = "rules:\n  - {name: all, dst: ['::/0'], rate: 5mbit}\n"
    pod = K.deployment_pod(annotations={"shaper.io/rules": rules, "kubernetes.io/egress-bandwidth": "10M",
                                        "kubernetes.io/ingress-bandwidth": "10M"})
    resp, _ = admit(pod)
    assert resp["warnings"] == [("kubernetes.io/egress-bandwidth ignored: shaper.io/rules rule 'all' already shapes "
                                 "every peer (::/0) on egress")]


def test_annotation_keys_are_escaped_in_the_patch():
    resp, _ = admit(K.deployment_pod(annotations={"a": "b"}))
    paths = [op["path"] for op in json.loads(base64.b64decode(resp["patch"]))]
    assert "/metadata/annotations/shaper.io~1status" in paths and "/metadata/labels/shaper.io~1injected" in paths


def test_http_routes():
    app = W.WebhookApp(CFG)
    body = json.dumps(K.review(K.deployment_pod())).encode()
    ok = app.handle("POST", "/inject", {}, body)
    assert ok.status == 200 and ok.json()["response"]["patchType"] == "JSONPatch"
    assert app.handle("GET", "/healthz", {}, b"").status == 200
    assert app.handle("GET", "/inject", {}, b"").status == 405
    assert app.handle("POST", "/mutate", {}, body).status == 404
    assert app.handle("POST", "/inject", {}, b"{").status == 400
    assert app.handle("POST", "/inject", {}, b"[]").status == 400
    assert app.handle("POST", "/inject", {}, json.dumps({"kind": "AdmissionReview"}).encode()).status == 400
    no_uid = K.review(K.deployment_pod())
    del no_uid["request"]["uid"]
    assert app.handle("POST", "/inject", {}, json.dumps(no_uid).encode()).status == 400
    assert app.handle("POST", "/inject", {}, b" " * (W.MAX_REVIEW_BYTES + 1)).status == 413
    for bad in ({"metadata": []}, {"metadata": {"annotations": "x"}}, {"spec": {"containers": 5}}):
        req = K.review(K.deployment_pod())
        req["request"]["object"] = bad
        assert app.handle("POST", "/inject", {}, json.dumps(req).encode()).status == 400, bad
    req = K.review(K.deployment_pod())
    req["request"]["object"] = "pod"  # not an object at all: allowed, untouched
    resp = app.handle("POST", "/inject", {}, json.dumps(req).encode())
    assert resp.status == 200 and "patch" not in resp.json()["response"]
    # The opt-in path injects only annotated pods.
    plain = json.dumps(K.review(K.deployment_pod("other"))).encode()
    assert "patch" not in app.handle("POST", W.OPT_IN_PATH, {}, plain).json()["response"]
    annotated = json.dumps(K.review(K.deployment_pod("other", annotations={"shaper.io/inject": "true"}))).encode()
    assert "patch" in app.handle("POST", W.OPT_IN_PATH, {}, annotated).json()["response"]
