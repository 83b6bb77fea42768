"""The image, built and run for real with podman: the sidecar exactly as the webhook injects it
(its args, capabilities, seccomp, mounts, token and downward-API rules translated to podman
flags) inside a "pod" network namespace, driven from a "client" namespace, shaping on the host
kernel; and the webhook served by the same image as its non-root default user."""

import http.client
import json
import re
import ssl
import subprocess
import time
from pathlib import Path

from lab import POD_IF, ROOT, V4, NetnsHTTPConnection, netns_connect, sh, wait_until
from shaper.k8s import webhook as W
from tests.container.conftest import podman
from tests.support import k8s_pods as K

TOKEN = "container-tier-token-5f1c2e"


def podman_flags(container: dict, volumes: list[dict], host_paths: dict[str, str]) -> list[str]:
    """`podman run` flags for an injected container spec (what the kubelet would do with it)."""
    sc = container["securityContext"]
    flags = ["--cap-drop", "ALL"]
    for cap in sc["capabilities"]["add"]:
        flags += ["--cap-add", cap]
    if sc.get("seccompProfile", {}).get("type") == "Unconfined":
        flags += ["--security-opt", "seccomp=unconfined"]
    if sc.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if sc.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    flags += ["--user", str(sc["runAsUser"])]
    by_name = {v["name"]: v for v in volumes}
    for mount in container["volumeMounts"]:
        vol = by_name[mount["name"]]
        if "emptyDir" in vol:
            flags += ["--tmpfs", mount["mountPath"]]
            continue
        src = host_paths.get(vol["name"]) or vol["hostPath"]["path"]
        flags += ["-v", f"{src}:{mount['mountPath']}" + (":ro" if mount.get("readOnly") else "")]
    for env in container["env"]:
        value = env.get("value")
        if value is None:  # the Secret
            assert env["valueFrom"]["secretKeyRef"]["key"] == "token"
            value = TOKEN
        flags += ["-e", f"{env['name']}={value}"]
    return flags


def run_sidecar(image: str, lab, bpffs: Path, name: str, tmp_path: Path, *, rules: str = "",
                container: dict | None = None, volumes: list[dict] | None = None,
                detach: bool = True) -> subprocess.CompletedProcess:
    """`podman run` of the injected sidecar in the lab's pod namespace; `rules` is what the
    downward API would write from the pod's shaper.io/rules annotation."""
    container = container or W.sidecar_container(W.SidecarConfig(image=image), POD_IF)
    podinfo = tmp_path / "podinfo"
    podinfo.mkdir(exist_ok=True)
    (podinfo / "rules").write_text(rules)
    flags = podman_flags(container, volumes or W.sidecar_volumes(),
                         {"shaper-bpffs": str(bpffs), "shaper-podinfo": str(podinfo)})
    return podman("run", "--detach" if detach else "--rm", "--name", name, "--network", f"ns:/run/netns/{lab.pod}",
                  *flags, image, *container["args"], check=detach, timeout=120)


def request(netns: str, method: str, path: str, body=None, token: str | None = None,
            host: str = V4["pod"]) -> tuple[int, str]:
    conn = NetnsHTTPConnection(netns, host, 2332, timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def ready(netns: str) -> bool:
    try:
        return request(netns, "GET", "/readyz")[0] == 200
    except OSError:
        return False


def logs(name: str) -> str:
    proc = podman("logs", name, check=False)
    return proc.stdout + proc.stderr


def metric(text: str, name: str, rule: str) -> float:
    m = re.search(rf'^{name}{{[^}}]*rule="{rule}"[^}}]*}} (\S+)$', text, re.M)
    assert m, f"{name}{{rule={rule}}} not in /metrics"
    return float(m.group(1))


def test_sidecar_as_injected_shapes_per_destination(image, lab, bpffs, containers, tmp_path):
    client = lab.add_client()
    name = containers()
    started = time.monotonic()
    # The pod's shaper.io/rules annotation, as the downward API writes it.
    run_sidecar(image, lab, bpffs, name, tmp_path, rules=f"rules:\n  - name: b\n    dst: [{V4['b']}/32]\n    rate: 50mbit\n")
    assert wait_until(lambda: ready(client), 90, 0.2), logs(name)
    print(f"\ncontainer start to ready: {time.monotonic() - started:.2f} s")
    inspect = json.loads(podman("inspect", name).stdout)[0]
    assert inspect["Config"]["User"] == "0" and inspect["HostConfig"]["ReadonlyRootfs"] is True
    assert sorted(inspect["EffectiveCaps"]) == ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]

    # The annotation's rule is in place; changes need the token from the Secret.
    status, body = request(client, "GET", "/rules")
    assert status == 200 and json.loads(body)["rules"] == [{"name": "b", "dst": [f"{V4['b']}/32"], "rate": "50mbit"}]
    assert request(client, "PUT", "/rules/a", {"dst": [V4["a"]], "rate": "2mbit"})[0] == 401
    status, body = request(client, "PUT", "/rules/a", {"dst": [V4["a"]], "rate": "2mbit"}, token=TOKEN)
    assert status == 200, body

    shaped = lab.throughput(V4["a"], 3)
    other = lab.throughput(V4["d"], 2)
    print(f"rate a (2mbit): {shaped / 1e6:.2f} Mbit/s; unshaped d: {other / 1e6:.0f} Mbit/s")
    assert 1.8e6 <= shaped <= 2.2e6  # +/-10%
    assert other > 50e6

    status, text = request(client, "GET", "/metrics")
    assert status == 200
    sent = metric(text, "shaper_class_bytes_total", "a")
    assert sent >= 0.9 * 3 * 2e6 / 8  # at least what 3 s at 2 Mbit/s carried
    # The classifier counts skb->len (a GSO super-packet once); HTB counts every segment's headers.
    assert 0.9 * sent <= metric(text, "shaper_rule_matched_bytes_total", "a") <= sent
    assert metric(text, "shaper_rule_rate_bytes_per_second", "a") == 2e6 / 8
    assert metric(text, "shaper_rule_rate_bytes_per_second", "b") == 50e6 / 8

    assert len(list((bpffs / "shaper").iterdir())) == 1  # pinned in the node's bpffs, for adoption
    # SIGTERM (podman stop, the image's STOPSIGNAL): the daemon removes what it made and exits 0.
    podman("stop", "--time", "30", name)
    assert json.loads(podman("inspect", name).stdout)[0]["State"]["ExitCode"] == 0, logs(name)
    assert "daemon.exit" in logs(name)
    qdiscs = sh("tc", "-n", lab.pod, "qdisc", "show", "dev", POD_IF).stdout
    assert "htb" not in qdiscs and "clsact" not in qdiscs, qdiscs
    assert not (bpffs / "shaper").exists(), list(bpffs.rglob("*"))


def test_bad_rules_annotation_is_logged_not_a_crash_loop(image, lab, bpffs, containers, tmp_path):
    client = lab.add_client()
    name = containers()
    run_sidecar(image, lab, bpffs, name, tmp_path, rules="rules:\n  - name: b\n    dst: [10.77.0.3/32]\n    rate: fast\n")
    assert wait_until(lambda: ready(client), 90, 0.2), logs(name)
    assert json.loads(request(client, "GET", "/rules")[1]) == {"rules": []}
    [line] = [json.loads(x) for x in logs(name).splitlines() if '"rules.invalid"' in x]
    assert line["level"] == "warning" and "rules[0].rate" in line["error"]
    assert line["action"] == "starting with no rules"


def test_missing_kernel_headers_are_named(image, lab, bpffs, containers, tmp_path):
    """Without the node's /lib/modules and /usr/src the daemon says what is missing and exits."""
    container = W.sidecar_container(W.SidecarConfig(image=image), POD_IF)
    vols = [v for v in W.sidecar_volumes() if v["name"] not in ("shaper-modules", "shaper-src")]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] in {v["name"] for v in vols}]
    proc = run_sidecar(image, lab, bpffs, containers(), tmp_path, container=container, volumes=vols, detach=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "kernel headers" in out and "mount the node's /lib/modules and /usr/src read-only" in out, out
    assert "Traceback" not in out
    assert "clsact" not in sh("tc", "-n", lab.pod, "qdisc", "show", "dev", POD_IF).stdout


def test_webhook_served_by_the_image_as_non_root(image, lab, containers, tmp_path):
    """`shaper webhook` from the image, as deploy/webhook.yaml runs it: default (non-root) user,
    no capabilities, read-only root, TLS from mounted files; an AdmissionReview from another namespace."""
    certs = tmp_path / "tls"
    sh("bash", str(ROOT / "deploy" / "secrets.sh"), str(certs), str(tmp_path / "token"))
    certs.chmod(0o755)
    (certs / "tls.key").chmod(0o644)  # readable by the container's user (a Secret volume is 0644 too)
    client = lab.add_client()
    name = containers()
    podman("run", "--detach", "--name", name, "--network", f"ns:/run/netns/{lab.pod}", "--cap-drop", "ALL",
           "--read-only", "-v", f"{certs}:/etc/shaper/tls:ro", image, "webhook", "--listen", ":8443",
           "--tls-cert", "/etc/shaper/tls/tls.crt", "--tls-key", "/etc/shaper/tls/tls.key",
           "--image", "registry.example/shaper:0.1.0")
    inspect = json.loads(podman("inspect", name).stdout)[0]
    assert inspect["Config"]["User"] == "65532:65532" and inspect["EffectiveCaps"] in (None, [])
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))

    def post(body: bytes) -> tuple[int, dict]:
        raw = netns_connect(client, V4["pod"], 8443, 10)
        conn = http.client.HTTPSConnection("shaper-webhook.shaper-system.svc", 8443, context=ctx, timeout=10)
        conn.sock = ctx.wrap_socket(raw, server_hostname="shaper-webhook.shaper-system.svc")
        try:
            conn.request("POST", "/inject", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    pod = K.statefulset_pod("shop")
    assert wait_until(lambda: _answers(post, K.review(pod)), 30, 0.2), logs(name)
    injected = K.apply_response(pod, post(json.dumps(K.review(pod)).encode())[1]["response"])
    cases = {
        "deployment": (K.deployment_pod("shop"), True),
        "statefulset": (K.statefulset_pod("shop", 2), True),
        "init containers": (K.pod_with_init_containers("shop"), True),
        "no volumes, labels or annotations": (K.bare_pod("shop"), True),
        "opted in elsewhere": (K.deployment_pod("other", annotations={"shaper.io/inject": "true"}), True),
        "already injected": (injected, False),
        "opted out": (K.deployment_pod("shop", annotations={"shaper.io/inject": "false"}), False),
        "kube-system": (K.deployment_pod("kube-system"), False),
        "the webhook's namespace": (K.deployment_pod("shaper-system"), False),
    }
    for what, (pod, inject) in cases.items():
        req = K.review(pod)
        status, out = post(json.dumps(req).encode())
        assert status == 200 and out["response"]["uid"] == req["request"]["uid"], what
        assert out["response"]["allowed"] is True, what
        patched = K.apply_response(pod, out["response"])
        K.validate_pod(patched)
        sidecars = [c for c in patched["spec"].get("initContainers", []) if c["name"] == "shaper"]
        assert len(sidecars) == 1 if inject else patched == pod, what
        if inject:
            assert sidecars[0]["image"] == "registry.example/shaper:0.1.0" and \
                patched["spec"]["initContainers"][0] is sidecars[0], what
        else:
            assert patched == pod, what

    # Certificate rotation (cert-manager renews in place): the next connections get the new one.
    for f in ("ca.crt", "tls.crt", "tls.key"):
        (certs / f).unlink()
    sh("bash", str(ROOT / "deploy" / "secrets.sh"), str(certs), str(tmp_path / "token"))
    certs.chmod(0o755)
    (certs / "tls.key").chmod(0o644)
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    assert wait_until(lambda: _answers(post, K.review(K.deployment_pod("shop"))), 10, 0.2), logs(name)
    assert '"tls.reloaded"' in logs(name)


def _answers(post, review) -> bool:
    try:
        return post(json.dumps(review).encode())[0] == 200
    except OSError:  # ssl.SSLError included: the old certificate, until it is reloaded
        return False


def test_image_size_is_reported(image):
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)
    print(f"\nimage {image}: {size / 1e6:.0f} MB")
    # bcc brings LLVM and clang (about 225 MB of the total); anything far beyond means a leak into the image.
    assert size < 700e6
    listing = podman("run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
                     "ls /opt/shaper/lib/python3*/site-packages; ls /var/lib/apt/lists | wc -l")
    for package in ("pyroute2", "prometheus_client", "click", "yaml", "shaper"):
        assert package in listing.stdout.split(), (package, listing.stdout)
    assert listing.stdout.strip().splitlines()[-1] == "0"  # no apt lists left in the image


def test_missing_capability_is_named(image, lab, bpffs, containers, tmp_path):
    """Without CAP_PERFMON the verifier refuses the classifier: the one-line reason says what to add."""
    container = W.sidecar_container(W.SidecarConfig(image=image), POD_IF)
    container["securityContext"]["capabilities"]["add"].remove("PERFMON")
    proc = run_sidecar(image, lab, bpffs, containers(), tmp_path, container=container, detach=False)
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert proc.returncode != 0
    assert last.startswith("shaper: the kernel's verifier refused the classifier") and "CAP_PERFMON" in last, last
    assert not (bpffs / "shaper").exists(), list(bpffs.rglob("*"))
