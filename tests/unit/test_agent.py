"""The node agent without root: target specs, what discovery reads (/proc texts, runtime answers,
CRI state directories), and the agent's API over fake datapaths (shaper.agent)."""

import json
import os
import subprocess

import pytest

from shaper.agent import discover
from shaper.agent.agent import Agent
from shaper.agent.api import AgentApi
from shaper.agent.targets import TargetSpec, parse_target
from shaper.datapath.fake import FakeDatapath
from shaper.errors import Conflict, InvalidInput, NotFound

TOKEN = "unit-agent-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- specs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, kind, value", [
    ("10.244.1.7", "ip", "10.244.1.7"),
    ("ip:10.244.1.7", "ip", "10.244.1.7"),
    ("fd00::07", "ip", "fd00::7"),  # one spelling per address
    ("pid:0042", "pid", "42"),
    ("netns:blue", "netns", "blue"),
    ("netns:/proc/42/ns/net", "netns", "/proc/42/ns/net"),
    ("container:web-1", "container", "web-1"),
    ("web-1", "container", "web-1"),
    ("podman:3f2a9c", "podman", "3f2a9c"),
    ("cri:db", "cri", "db"),
])
def test_target_forms(text, kind, value):
    spec = parse_target(text)
    assert (spec.kind, spec.value) == (kind, value)
    assert parse_target(str(spec)) == spec  # what GET /targets shows names it again


@pytest.mark.parametrize("text, says", [
    ("", "empty"),
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("pid:abc", "not a process id"),
    ("pid:0", "not a process id"),
    ("1234", "pid:PID"),
    ("netns:../x", "not a namespace name"),
    ("netns:/run/netns/../../etc", "not a namespace file the agent opens"),
    ("netns:/etc/shadow", "not a namespace file the agent opens"),
    ("netns:/proc/1/root/etc/passwd", "not a namespace file the agent opens"),
    ("netns:/proc/self/fd/3", "not a namespace file the agent opens"),
    ("netns:/run/netns/..", "not a namespace file the agent opens"),
    ("pid:\u00b2", "not a process id"),
    ("inode:x", "not a namespace inode"),
    ("podman:", "names no podman"),
    ("container:-rm", "not a container name"),
    ("nope:x", "neither an address nor a container name"),
    ("ip:10.0.0", "not an IPv4 or IPv6 address"),
])
def test_bad_targets_are_named(text, says):
    with pytest.raises(InvalidInput) as exc:
        parse_target(text)
    assert says in str(exc.value) and exc.value.field == "target"


# -- what discovery reads -------------------------------------------------------------------------------
FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.80.0.0/24 2 0 2
        |-- 10.80.0.0
           /24 link UNICAST
        |-- 10.80.0.2
           /32 host LOCAL
        |-- 10.80.0.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
"""
IF_INET6 = """fd000000000000000000000000000007 02 40 00 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""


def test_local_addresses_from_proc_texts():
    assert discover.v4_local(FIB_TRIE) == {"10.80.0.2", "127.0.0.1"}  # not the subnet, not the broadcast
    assert discover.v6_local(IF_INET6) == {"fd00::7", "::1"}


def completed(stdout="", stderr="", code=0):
    return subprocess.CompletedProcess([], code, stdout, stderr)


def resolver(answers: dict, installed=("podman", "crictl"), cri_state=(), cgroups: str = "") -> discover.Resolver:
    def run(argv):
        return answers[tuple(argv[:2])](argv)

    return discover.Resolver(which=lambda name: f"/usr/bin/{name}" if name in installed else None, run=run,
                             cri_state=cri_state, cgroup_of=lambda pid: cgroups)


def test_podman_by_name_and_its_refusals():
    me = os.getpid()
    answers = {("podman", "inspect"): lambda argv: completed(json.dumps([{
        "Name": "web", "Id": "3f2a9c0e11aa77", "State": {"Running": True, "Pid": me}}]))}
    found = resolver(answers, installed=("podman",))._by_container(TargetSpec("podman", "web"))
    assert found.pid == me and found.inode == os.stat("/proc/self/ns/net").st_ino
    assert found.labels == {"runtime": "podman", "container": "web", "container_id": "3f2a9c0e11aa"}

    stopped = {("podman", "inspect"): lambda argv: completed(json.dumps([{"Name": "web", "State": {"Running": False,
                                                                                                    "Pid": 0}}]))}
    with pytest.raises(NotFound, match="not running"):
        resolver(stopped, installed=("podman",))._by_container(TargetSpec("podman", "web"))
    missing = {("podman", "inspect"): lambda argv: completed(stderr="Error: no such container web", code=125)}
    with pytest.raises(NotFound, match="no running container named web"):
        resolver(missing, installed=("podman",))._by_container(TargetSpec("container", "web"))
    with pytest.raises(NotFound, match="none of podman is installed"):
        resolver({}, installed=())._by_container(TargetSpec("podman", "web"))


def test_crictl_by_name_gives_the_pod():
    me = os.getpid()
    listed = {"containers": [{"id": "aa11bb22cc33dd44", "metadata": {"name": "redis"}},
                             {"id": "ee55ff66", "metadata": {"name": "other"}}]}
    inspected = {"status": {"metadata": {"name": "redis"}, "labels": {"io.kubernetes.pod.name": "cache-0",
                                                                       "io.kubernetes.pod.namespace": "shop"}},
                 "info": {"pid": me}}
    answers = {("crictl", "ps"): lambda argv: completed(json.dumps(listed)),
               ("crictl", "inspect"): lambda argv: completed(json.dumps(inspected))
               if argv[-1] == "aa11bb22cc33dd44" else completed(code=1)}
    found = resolver(answers, installed=("crictl",))._by_container(TargetSpec("cri", "redis"))
    assert found.labels["pod"] == "cache-0" and found.labels["namespace"] == "shop" and found.pid == me


def test_cri_state_directories_of_containerd_and_crio(tmp_path):
    me = os.getpid()
    containerd = tmp_path / "containerd"
    crio = tmp_path / "crio"
    bundle = containerd / "k8s.io" / ("c0ffee" * 10)
    bundle.mkdir(parents=True)
    (bundle / "init.pid").write_text(f"{me}\n")
    (bundle / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.container-name": "api",
        "io.kubernetes.cri.sandbox-name": "api-7d9", "io.kubernetes.cri.sandbox-namespace": "shop"}}))
    sandbox = containerd / "k8s.io" / ("5a" * 32)
    sandbox.mkdir()
    (sandbox / "init.pid").write_text(f"{me}\n")
    (sandbox / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-name": "api"}}))
    userdata = crio / ("d00d" * 16) / "userdata"
    userdata.mkdir(parents=True)
    (userdata / "pidfile").write_text(str(me))
    (userdata / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.container.name": "worker", "io.kubernetes.pod.name": "worker-0",
        "io.kubernetes.pod.namespace": "jobs"}}))
    # The processes' cgroups name their containers (a pid file alone may be a stopped container's).
    cgroups = f"0::/kubepods/pod1/cri-containerd-{'c0ffee' * 10}.scope\n0::/crio-{'d00d' * 16}.scope\n"
    r = resolver({}, installed=(), cri_state=(str(containerd), str(crio)), cgroups=cgroups)

    api = r._by_container(TargetSpec("container", "api"))  # the container, not the sandbox named "api"
    assert api.labels == {"runtime": "cri", "container_id": "c0ffeec0ffee", "container": "api", "pod": "api-7d9",
                          "namespace": "shop"}
    assert r._by_container(TargetSpec("cri", "c0ffeec0ffeec0")).labels["pod"] == "api-7d9"  # an id prefix
    assert r._by_container(TargetSpec("cri", "worker")).labels["namespace"] == "jobs"
    # A pod named by its IP gets its name from whichever container of it shares its namespace.
    assert r.pod_of(os.stat("/proc/self/ns/net").st_ino) == {"pod": "api-7d9", "namespace": "shop"}
    assert r.pod_of(1) == {}
    with pytest.raises(NotFound):
        r._by_container(TargetSpec("cri", "c0ffee"))  # a prefix this short is not taken for an id

    stale = resolver({}, installed=(), cri_state=(str(containerd), str(crio)), cgroups="0::/user.slice\n")
    with pytest.raises(NotFound):  # the PID in the pid file is no longer the container's
        stale._by_container(TargetSpec("cri", "api"))
    podman_like = crio / ("ab" * 32) / "userdata"  # podman shares CRI-O's root, with no config.json there
    podman_like.mkdir(parents=True)
    (podman_like / "pidfile").write_text(str(me))
    with pytest.raises(NotFound):
        resolver({}, installed=(), cri_state=(str(crio),), cgroups="ab" * 32)._by_container(
            TargetSpec("cri", "ab" * 32))

    twin = containerd / "k8s.io" / ("beef" * 16)
    twin.mkdir()
    (twin / "init.pid").write_text(str(me))
    (twin / "config.json").write_text(json.dumps({"annotations": {"io.kubernetes.cri.container-name": "api",
                                                                  "io.kubernetes.cri.sandbox-name": "api-x2",
                                                                  "io.kubernetes.cri.sandbox-namespace": "shop"}}))
    with pytest.raises(Conflict, match="shop/api-x2"):
        resolver({}, installed=(), cri_state=(str(containerd),), cgroups=cgroups + "beef" * 16)._by_container(
            TargetSpec("cri", "api"))


def test_the_nodes_own_namespace_is_never_a_target():
    with pytest.raises(InvalidInput, match="node's own network namespace"):
        discover.Resolver().resolve(TargetSpec("pid", str(os.getpid())))


# -- the API over fake datapaths --------------------------------------------------------------------------
class Claims:
    def __init__(self):
        self.held: list[str] = []

    def __call__(self, ifname, path):
        claims = self

        class Claim:
            def close(self):
                claims.held.remove(path)

        self.held.append(path)
        return Claim()


class World:
    """Targets a fake resolver knows: spec text -> namespace file; what the sweeper finds alive."""

    def __init__(self, tmp_path):
        self.files = {}
        self.live = set()
        self.tmp = tmp_path
        self.datapaths = {}
        self.claims = Claims()

    def pod(self, spec: str, **labels) -> int:
        path = self.tmp / f"ns-{len(self.files)}"
        path.write_text("")
        inode = os.stat(path).st_ino
        self.files[spec] = (inode, str(path), labels)
        self.live.add(inode)
        return inode

    def resolve(self, spec):
        if str(spec) == "10.0.0.99":
            raise Conflict("the address 10.0.0.99 is held by 2 network namespaces")
        if str(spec) not in self.files:
            raise NotFound(f"no network namespace on this node holds the address {spec}")
        inode, path, labels = self.files[str(spec)]
        return discover.Found(inode, path, 7, labels)

    def open_datapath(self, ifname, path, record):
        dp = FakeDatapath(ifname=ifname, attached=False)
        self.datapaths[os.fstat(int(path.rsplit("/", 1)[1])).st_ino] = (dp, record)
        return dp

    def agent(self) -> Agent:
        r = discover.Resolver(cri_state=())
        r.resolve = self.resolve  # type: ignore[method-assign]
        r.still_holds = lambda pid, inode, addr: inode in self.live  # type: ignore[method-assign]
        agent = Agent("eth0", bpffs=str(self.tmp / "bpffs"), resolver=r, open_datapath=self.open_datapath,
                      claim=self.claims, alive=lambda inodes: set(inodes) & self.live,
                      nsfs_dev=os.stat(self.tmp).st_dev)
        agent.ready = True
        return agent


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def call(api, method, path, body=None, headers=AUTH):
    resp = api.handle(method, path, headers, json.dumps(body).encode() if body is not None else b"")
    return resp.status, (resp.json() if resp.content_type == "application/json" else resp.body.decode())


def test_reads_and_dry_runs_touch_nothing_and_the_first_put_shapes(world):
    a = world.pod("10.0.0.1", container="web")
    agent = world.agent()
    api = AgentApi(agent, TOKEN)
    assert call(api, "GET", "/targets/10.0.0.1/rules") == (200, {"rules": []})
    status, body = call(api, "PUT", "/targets/10.0.0.1/rules/db?dry_run=1", {"dst": ["10.1.0.1"], "rate": "1mbit"})
    assert status == 200 and body["dry_run"] and body["rule_changes"]
    assert call(api, "DELETE", "/targets/10.0.0.1/rules") == (200, {"deleted": []})
    status, _ = call(api, "PATCH", "/targets/10.0.0.1/rules/db", {"rate": "2mbit"})
    assert status == 404
    assert world.datapaths == {} and world.claims.held == [] and agent.targets == {}

    assert call(api, "PUT", "/targets/10.0.0.1/rules/db", {"dst": ["10.1.0.1"], "rate": "1mbit"},
                headers={})[0] == 401
    status, body = call(api, "PUT", "/targets/10.0.0.1/rules/db", {"dst": ["10.1.0.1"], "rate": "1mbit"})
    assert status == 200 and body["rate"] == "1mbit"
    dp, record = world.datapaths[a]
    assert record == {"target": "10.0.0.1", "container": "web"} and dp.attached and len(dp.classes) == 1
    assert call(api, "GET", "/targets")[1]["targets"][0]["rules"] == 1
    assert call(api, "GET", "/targets/10.0.0.1")[1]["container"] == "web"
    # A whole set through the agent, asked for the names only (the CLI's `apply -f --target`).
    status, body = call(api, "PUT", "/targets/10.0.0.1/rules", {"rules": [{"name": "db", "dst": ["10.1.0.1"]}]},
                        headers={**AUTH, "Prefer": "return=minimal"})
    assert (status, body) == (200, {"names": ["db"]})
    status, text = call(api, "GET", "/metrics")
    assert 'shaper_rules{container="web",interface="eth0",target="10.0.0.1"} 1.0' in text
    assert "shaper_agent_targets 1.0" in text


def test_without_the_token_only_targets_shaped_are_read(world):
    world.pod("10.0.0.1")
    world.pod("10.0.0.2")
    api = AgentApi(world.agent(), TOKEN)
    assert call(api, "PUT", "/targets/10.0.0.1/rules/db", {"dst": ["10.1.0.1"], "rate": "1mbit"})[0] == 200
    assert call(api, "GET", "/targets/10.0.0.1/rules", headers={})[0] == 200  # by the name it is shown by
    for path in ("/targets/10.0.0.2/rules", "/targets/container:web/stats", "/targets/10.0.0.2"):
        status, body = call(api, "GET", path, headers={})  # a look-up: /proc scans, container runtimes
        assert status == 401 and "needs the token" in body["error"], (path, body)
    assert call(api, "GET", "/targets/10.0.0.2/rules")[0] == 200  # with it


def test_errors_of_resolution_are_statuses(world):
    api = AgentApi(world.agent(), TOKEN)
    status, body = call(api, "PUT", "/targets/10.0.0.5/rules/db", {"dst": ["10.1.0.1"], "rate": "1mbit"})
    assert status == 404 and "10.0.0.5" in body["error"]
    assert call(api, "GET", "/targets/10.0.0.99/rules")[0] == 409
    status, body = call(api, "GET", "/targets/pid:x/rules")
    assert status == 422 and body["field"] == "target"
    assert call(api, "GET", "/targets/10.0.0.5")[0] == 404
    assert call(api, "DELETE", "/targets/10.0.0.5")[0] == 404
    assert call(api, "GET", "/targets/10.0.0.5/metrics")[0] == 404  # the per-target API is rules and stats


def test_sweep_drops_gone_targets_and_delete_resets(world):
    a, b = world.pod("10.0.0.1"), world.pod("pid:77")
    agent = world.agent()
    api = AgentApi(agent, TOKEN)
    for target in ("10.0.0.1", "pid:77"):
        assert call(api, "PUT", f"/targets/{target}/rules/x", {"dst": ["10.1.0.1"], "rate": "1mbit"})[0] == 200
    assert len(world.claims.held) == 2
    world.live.discard(a)  # its pod went
    assert agent.sweep() == []  # gone once: maybe a process between fork and exit, looked at again
    assert agent.sweep() == ["10.0.0.1"]
    assert sorted(agent.targets) == [b] and len(world.claims.held) == 1
    status, body = call(api, "GET", "/targets/10.0.0.1")
    assert status == 404 and "not shaped by this agent" in body["error"]
    status, body = call(api, "DELETE", "/targets/pid:77")
    assert status == 200 and body["deleted"] == "pid:77"
    dp, _ = world.datapaths[b]
    assert not dp.attached and dp.classes == {} and world.claims.held == [] and agent.targets == {}
    status, text = call(api, "GET", "/metrics")
    assert 'shaper_agent_swept_total{what="target"} 1.0' in text


def test_a_failed_attach_leaves_nothing_held(world):
    world.pod("10.0.0.1")
    agent = world.agent()

    def refuse(ifname, path, record):
        raise Conflict("eth0 is controlled by another shaper (process 42: shaper run --iface eth0)")

    agent.open_datapath = refuse
    status, body = call(AgentApi(agent, TOKEN), "PUT", "/targets/10.0.0.1/rules/x",
                        {"dst": ["10.1.0.1"], "rate": "1mbit"})
    assert status == 409 and "process 42" in body["error"]
    assert world.claims.held == [] and agent.targets == {}
