"""deploy/: every manifest validates against the Kubernetes API schemas, kustomize would deploy
all of them, they agree with the code (names, ports, paths, flags), and the Grafana dashboard
queries only metrics the daemon exports."""

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from shaper import cli
from shaper.agent import DEFAULT_AGENT_PORT, discover
from shaper.agent.agent import LABELS as AGENT_LABELS
from shaper.agent.agent import Agent
from shaper.agent.api import AgentApi
from shaper.control.service import Service
from shaper.core.model import parse_rule, parse_ruleset_text
from shaper.datapath.fake import FakeDatapath
from shaper.errors import InvalidInput
from shaper.http.api import Api
from shaper.http.server import check_exposure, parse_listen
from shaper.k8s import webhook as W
from tests.support import k8s_pods as K

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}  # CRDs: no schema in kubernetes-validate


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def objects() -> dict[tuple[str, str], dict]:
    out = {}
    for path in MANIFESTS:
        for d in docs(path):
            key = (d["kind"], d["metadata"]["name"])
            assert key not in out, f"{key} is defined twice under deploy/: the tests would see only one"
            out[key] = d
    return out


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_validates_against_the_api_schemas(path):
    for doc in docs(path):
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        for version in K.K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_validation_is_not_vacuous():
    webhook = objects()[("Deployment", "shaper-webhook")]
    broken = json.loads(json.dumps(webhook))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = ["Always"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K.K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("kustomization", sorted(DEPLOY.rglob("kustomization.yaml")),
                         ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kustomizations_deploy_every_manifest(kustomization):
    k = yaml.safe_load(kustomization.read_text())
    here = kustomization.parent
    listed = {(here / r).resolve() for r in k["resources"]}
    present = {p.resolve() for p in here.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == present
    # Generators read files that a secrets.sh makes (git ignores them all) or that are in the tree.
    made = {"secrets/tls.crt", "secrets/tls.key", "secrets/ca.crt", "token"}
    ignored = (DEPLOY.parent / ".gitignore").read_text().splitlines()
    for gen in k.get("secretGenerator", []) + k.get("configMapGenerator", []):
        for entry in gen["files"]:
            src = entry.split("=", 1)[-1]
            assert src in made or (here / src).is_file(), src
            if src in made:
                rel = "/" + (here / src).relative_to(DEPLOY.parent).as_posix()
                assert any(rel == i or (i.endswith("/") and rel.startswith(i)) for i in ignored), rel


def test_webhook_configuration_matches_the_webhook():
    conf = objects()[("MutatingWebhookConfiguration", "shaper-sidecar-injector")]
    service = objects()[("Service", "shaper-webhook")]
    namespace = service["metadata"]["namespace"]
    assert len(conf["webhooks"]) == 2
    for hook, path in zip(conf["webhooks"], (W.INJECT_PATH, W.OPT_IN_PATH)):
        ref = hook["clientConfig"]["service"]
        assert ref == {"name": "shaper-webhook", "namespace": namespace, "path": path, "port": 443}
        assert hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                  "resources": ["pods"], "scope": "Namespaced"}]
        never = [e for e in hook["namespaceSelector"]["matchExpressions"] if e["key"] == "kubernetes.io/metadata.name"]
        assert never == [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                          "values": ["kube-system", namespace]}]
        assert W.INJECT_ANNOTATION in hook["matchConditions"][0]["expression"]
    by_ns, by_pod = conf["webhooks"]
    assert {"key": "shaper-injection", "operator": "In", "values": ["enabled"]} in \
        by_ns["namespaceSelector"]["matchExpressions"]
    assert "!= 'false'" in by_ns["matchConditions"][0]["expression"]
    assert "== 'true'" in by_pod["matchConditions"][0]["expression"]
    assert service["spec"]["ports"][0]["port"] == 443
    # The webhook's own namespace opts out explicitly too.
    assert objects()[("Namespace", namespace)]["metadata"]["labels"]["shaper-injection"] == "disabled"


def test_webhook_deployment_runs_a_command_shaper_accepts():
    dep = objects()[("Deployment", "shaper-webhook")]
    pod = dep["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = [a.replace("$(SIDECAR_IMAGE)", "shaper:0.1.0") for a in container["args"]]
    ctx = cli.main.commands[args[0]].make_context(args[0], args[1:])
    assert ctx.params["listen"] == ":8443" and ctx.params["sidecar"] == "native"
    assert container["ports"][0]["containerPort"] == 8443
    mount = container["volumeMounts"][0]["mountPath"]
    assert ctx.params["tls_cert"].startswith(mount) and ctx.params["tls_key"].startswith(mount)
    assert pod["volumes"][0]["secret"]["secretName"] == "shaper-webhook-tls"
    assert {e["name"] for e in container["env"]} == {"SIDECAR_IMAGE", "POD_NAMESPACE"}
    # Non-root and restricted, as its namespace's Pod Security level requires.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_podmonitor_finds_the_sidecars():
    pm = objects()[("PodMonitor", "shaper-sidecars")]
    assert pm["spec"]["selector"]["matchLabels"] == {W.INJECTED_LABEL: "true"}
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    [endpoint] = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == W.METRICS_PORT_NAME and endpoint["path"] == "/metrics"
    assert W.sidecar_container(W.SidecarConfig(image="x"), "eth0")["ports"][0]["name"] == W.METRICS_PORT_NAME


def test_example_workload_gets_a_valid_sidecar_with_its_rules():
    objs = objects()
    sts = objs[("StatefulSet", "db")]
    ns = objs[("Namespace", sts["metadata"]["namespace"])]
    assert ns["metadata"]["labels"]["shaper-injection"] == "enabled"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    template = sts["spec"]["template"]
    rules = parse_ruleset_text(template["metadata"]["annotations"][W.RULES_ANNOTATION], "x", "x")
    assert [r.name for r in rules] == ["pods"] and rules[0].delay_us == 10_000
    pod = K.statefulset_pod(ns["metadata"]["name"], annotations=template["metadata"]["annotations"])
    pod["spec"]["containers"] = [dict(K.statefulset_pod()["spec"]["containers"][0], **template["spec"]["containers"][0])]
    out = W.review(K.review(pod), W.SidecarConfig(image="shaper:0.1.0"))["response"]
    assert "warnings" not in out
    K.validate_pod(K.apply_response(pod, out))
    # The opted-out client is left alone, and reads the token the sidecars use.
    client = objs[("Deployment", "client")]["spec"]["template"]
    assert client["metadata"]["annotations"][W.INJECT_ANNOTATION] == "false"
    secret_ref = client["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    assert secret_ref == {"name": W.SidecarConfig(image="x").token_secret, "key": "token"}


def agent_daemonset() -> tuple[dict, dict, dict]:
    """The agent's DaemonSet, its pod spec and its one container."""
    ds = objects()[("DaemonSet", "shaper-agent")]
    pod = ds["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return ds, pod, container


def test_agent_daemonset_runs_a_command_shaper_accepts():
    ds, pod, container = agent_daemonset()
    args = container["args"]
    assert args[0] == "agent"
    ctx = cli.main.commands[args[0]].make_context(args[0], list(args[1:]))
    host, port = parse_listen(ctx.params["listen"])
    assert port == DEFAULT_AGENT_PORT and ctx.params["iface"] == "eth0"
    assert not ctx.params["insecure"] and not ctx.params["reset_on_exit"]  # a restarted agent adopts
    # Listening beyond loopback, it starts only with its token, which comes from the environment.
    with pytest.raises(InvalidInput, match="no token"):
        check_exposure(host, None, ctx.params["insecure"])
    env = {e["name"]: e for e in container["env"]}
    assert "SHAPER_TOKEN" in env and not any(a.startswith("--token-file") for a in args)
    [port_spec] = container["ports"]
    assert port_spec == {"name": "agent-http", "containerPort": DEFAULT_AGENT_PORT, "hostPort": DEFAULT_AGENT_PORT,
                         "protocol": "TCP"}
    # The node's network and PIDs: its API on the node's addresses, pods found through /proc.
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    # Root (the image's default user is not) and privileged: it enters other pods' namespaces.
    assert container["securityContext"]["privileged"] is True and container["securityContext"]["runAsUser"] == 0
    assert pod["tolerations"] == [{"operator": "Exists"}]  # every node
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_agent_probes_hit_routes_the_agent_serves():
    _, _, container = agent_daemonset()
    agent = Agent()  # default arguments: no kernel access until a target is shaped
    api = AgentApi(agent, token="t")
    probes = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in probes.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "agent-http"}
        assert any(r.method == "GET" and r.path == path and not r.mutates for r in api.routes), path
    assert api.handle("GET", "/healthz", {}, b"").status == 200
    assert api.handle("GET", "/readyz", {}, b"").status == 503  # until an earlier agent's targets are adopted
    agent.ready = True
    assert api.handle("GET", "/readyz", {}, b"").status == 200
    assert api.handle("GET", "/metrics", {}, b"").status == 200  # what the PodMonitor scrapes, without the token


def test_agent_mounts_what_the_sidecar_mounts_and_the_runtimes_state():
    _, pod, container = agent_daemonset()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # The bpffs and the kernel headers, exactly as the sidecar gets them, and a /tmp beside a read-only root.
    side = W.sidecar_container(W.SidecarConfig(image="x"), "eth0")
    side_volumes = {v["name"]: v for v in W.sidecar_volumes()}
    shared = [m for m in side["volumeMounts"] if "hostPath" in side_volumes[m["name"]]]
    assert {m["mountPath"] for m in shared} == {"/lib/modules", "/usr/src", "/sys/fs/bpf"}
    for want in shared + [m for m in side["volumeMounts"] if m["mountPath"] == "/tmp"]:
        got = mounts[want["mountPath"]]
        assert got.get("readOnly", False) == want.get("readOnly", False), want["mountPath"]
        ours, theirs = volumes[got["name"]], side_volumes[want["name"]]
        assert {k: v for k, v in ours.items() if k != "name"} == {k: v for k, v in theirs.items() if k != "name"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {e["name"] for e in container["env"]} == {e["name"] for e in side["env"]}
    # The runtimes' state, read only; a node lacking a runtime gets an empty directory. What the node
    # unmounts is unmounted here too, so a dead pod's network namespace is never kept alive by the agent.
    for path in ("/run/containerd", "/run/containers", "/run/netns"):
        got = mounts[path]
        assert got["readOnly"] is True and got["mountPropagation"] == "HostToContainer", path
        assert volumes[got["name"]]["hostPath"] == {"path": path, "type": "DirectoryOrCreate"}, path
    # Every state directory the agent reads for container: targets is the node's, through one of them.
    for state in discover.CRI_STATE:
        [mount] = [m for p, m in mounts.items() if state.startswith(p + "/")]
        assert volumes[mount["name"]]["hostPath"]["path"] == mount["mountPath"], state
    assert set(volumes) == {m["name"] for m in container["volumeMounts"]}


def test_agent_token_is_the_generated_secret_and_the_agent_has_no_api_access():
    ds, pod, container = agent_daemonset()
    namespace = ds["metadata"]["namespace"]
    k = yaml.safe_load((DEPLOY / "agent" / "kustomization.yaml").read_text())
    [gen] = k["secretGenerator"]
    ref = {e["name"]: e for e in container["env"]}["SHAPER_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": gen["name"], "key": "token"}
    assert gen["namespace"] == namespace and gen["files"] == [ref["key"]]  # the file's name is the key
    assert gen["options"]["disableNameSuffixHash"] is True  # harnesses read it by name
    assert k["images"] == yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["images"]
    # Its own namespace, privileged (only that one), never injected.
    labels = objects()[("Namespace", namespace)]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged" and labels["shaper-injection"] == "disabled"
    account = objects()[("ServiceAccount", pod["serviceAccountName"])]
    assert account["metadata"]["namespace"] == namespace and account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False
    bound = [o for (kind, _), o in objects().items() if kind in ("RoleBinding", "ClusterRoleBinding")
             for s in o["subjects"] if s["kind"] == "ServiceAccount" and s["name"] == pod["serviceAccountName"]]
    assert bound == []


def test_podmonitor_finds_the_agents():
    ds, pod, container = agent_daemonset()
    pm = objects()[("PodMonitor", "shaper-agents")]
    assert pm["metadata"]["namespace"] == ds["metadata"]["namespace"] and "namespaceSelector" not in pm["spec"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    [endpoint] = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == container["ports"][0]["name"] and endpoint["path"] == "/metrics"
    # The agent's pod labels never stand in for (or rename) the shaped pod's, which its series carry.
    [drop] = [r for r in endpoint["relabelings"] if r.get("action") == "labeldrop"]
    assert all(re.fullmatch(drop["regex"], label) for label in AGENT_LABELS)


def exported_metric_names() -> set[str]:
    """Every sample name /metrics has with rules that set each configured field."""
    service = Service(FakeDatapath(), "eth0")
    service.start([parse_rule({"name": "a", "dst": ["10.0.0.0/8"], "delay": "10ms", "jitter": "1ms",
                               "loss": "1%", "rate": "2mbit"}),
                   parse_rule({"name": "b", "dst": ["fd00::/8"], "rate": "1gbit"})])
    body = Api(service).handle("GET", "/metrics", {}, b"").body.decode()
    return {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line and not line.startswith("#")}


def metric_labels() -> dict[str, set[str]]:
    """Every sample name /metrics has, with the label names it carries, with rules in each direction."""
    service = Service(FakeDatapath(), "eth0")
    service.start([parse_rule({"name": "a", "dst": ["10.0.0.0/8"], "direction": "both", "delay": "10ms",
                               "jitter": "1ms", "loss": "1%", "rate": "2mbit"}),
                   parse_rule({"name": "b", "src": ["fd00::/8"], "protocol": "tcp", "ports": [443], "rate": "1gbit"})])
    body = Api(service).handle("GET", "/metrics", {}, b"").body.decode()
    out: dict[str, set[str]] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, labels = line.partition("{")
            out.setdefault(name.split(" ")[0], set()).update(re.findall(r'(\w+)="', labels))
    return out


def test_dashboard_queries_filter_on_direction():
    """A series with a direction label (egress, ingress) is always selected by $direction and never summed
    across it (a rule in both directions would add its two classes up); a series without one is never
    filtered on it (the filter would empty the panel once a direction is chosen)."""
    dash = json.loads((DEPLOY / "grafana" / "shaper-dashboard.json").read_text())
    labels = metric_labels()
    directed = {name for name, keys in labels.items() if "direction" in keys}
    assert {"shaper_class_bytes_total", "shaper_rule_matched_packets_total", "shaper_rule_delay_seconds",
            "shaper_map_entries"} <= directed and "shaper_rules" not in directed
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    query = variables["direction"]["query"]["query"]
    assert re.fullmatch(r"label_values\((shaper_[a-z_]+)\{[^}]*\}, direction\)", query)
    assert re.search(r"shaper_[a-z_]+", query)[0] in directed
    names = list(variables)
    assert names.index("pod") < names.index("direction") < names.index("rule")  # rules of the chosen direction
    exprs = [(p["title"], t["expr"], t.get("legendFormat", "")) for p in dash["panels"] for t in p["targets"]]
    exprs += [(f"${name}", v["query"]["query"], "") for name, v in variables.items()
              if isinstance(v.get("query"), dict) and name != "direction"]  # which lists the directions
    filtered = 0
    for where, expr, legend in exprs:
        for metric, selector in re.findall(r"\b(shaper_[a-z_]+)(?:\{([^}]*)\})?", expr):
            if metric in directed:
                assert 'direction=~"$direction"' in selector, (where, expr)
                filtered += 1
            else:
                assert "direction" not in selector, (where, expr)
        for by in re.findall(r"\bby \(([^)]*)\)", expr):
            if any(m in directed for m in re.findall(r"\bshaper_[a-z_]+", expr)) and by != "le":
                assert "direction" in by, (where, expr)
        if "{{rule}}" in legend or "direction" in expr.split("{")[0]:
            assert "{{direction}}" in legend, (where, legend)
    assert filtered >= 11  # the ten per-rule and prefix queries and $rule, today


def test_dashboard_queries_name_exported_metrics():
    dash = json.loads((DEPLOY / "grafana" / "shaper-dashboard.json").read_text())
    exported = exported_metric_names()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    used = {m for e in exprs for m in re.findall(r"\bshaper_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("delay", "rate", "throughput", "drops", "backlog"):
        assert needed in titles
    # The per-rule configuration the dashboard shows is exported.
    assert {"shaper_rule_delay_seconds", "shaper_rule_rate_bytes_per_second", "shaper_rule_loss_ratio",
            "shaper_class_bytes_total", "shaper_class_drops_total", "shaper_class_backlog_bytes"} <= used
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
