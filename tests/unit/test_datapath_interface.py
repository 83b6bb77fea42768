"""Every datapath implements the whole of shaper.datapath.interface.Datapath, with its
signatures: the Protocol is the one list a new datapath (ingress through an ifb) implements,
and nothing above shaper.datapath reaches past it.  No root."""

import ast
import inspect
import typing
from pathlib import Path

import pytest

import shaper
from shaper.datapath.fake import FakeDatapath
from shaper.datapath.interface import Datapath
from shaper.datapath.kernel import KernelDatapath

IMPLEMENTATIONS = [KernelDatapath, FakeDatapath]
MEMBERS = sorted(name for name in vars(Datapath) if not name.startswith("_"))
PROPERTIES = sorted(name for name in MEMBERS if isinstance(vars(Datapath)[name], property))
METHODS = sorted(set(MEMBERS) - set(PROPERTIES))


def test_the_protocol_names_what_the_issue_asks_for():
    # What the controller, the service and the daemon call (issue 13), and the identity the daemon logs.
    assert set(MEMBERS) >= {"attach", "is_attached", "link_present", "reset", "close", "observe", "execute",
                            "counters", "class_stats", "rule_names", "map_entries", "write_intent", "read_intent",
                            "clear_intent", "ifindex", "ifname"}
    for name in MEMBERS:
        member = vars(Datapath)[name]
        doc = (member.fget if isinstance(member, property) else member).__doc__
        assert doc and doc.strip(), f"Datapath.{name} has no contract"


def _attribute_type(cls: type, name: str):
    """The type of a property's value, or of a dataclass field or class-level annotation; None if absent."""
    member = inspect.getattr_static(cls, name, None)
    if isinstance(member, property):
        return typing.get_type_hints(member.fget).get("return")
    return typing.get_type_hints(cls).get(name)


def _problems(cls: type) -> list[str]:
    """How `cls` departs from the Protocol: members missing, or with another signature or type."""
    out = []
    for name in PROPERTIES:
        got = _attribute_type(cls, name)
        if got != _attribute_type(Datapath, name):
            out.append(f"{name}: {got}")
    for name in METHODS:
        impl = inspect.getattr_static(cls, name, None)
        if not inspect.isfunction(impl):
            out.append(f"{name}: missing")
            continue
        want, got = inspect.signature(getattr(Datapath, name)), inspect.signature(impl)
        if [(p.name, p.kind, p.default) for p in got.parameters.values()] != \
                [(p.name, p.kind, p.default) for p in want.parameters.values()] or \
                typing.get_type_hints(impl) != typing.get_type_hints(getattr(Datapath, name)):
            out.append(f"{name}: {got}")
    return out


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_each_datapath_implements_every_member_with_its_signature(cls):
    assert _problems(cls) == []


def test_the_check_names_a_missing_member_and_a_changed_signature():
    class Broken(FakeDatapath):
        ifindex: str = "1"

        def counters(self, slots: list[int], extra: int = 0) -> dict:  # type: ignore[override]
            return {}

        def class_stats(self):  # no annotations
            return {}

    Broken.link_present = None  # type: ignore[assignment]
    assert [p.split(":")[0] for p in _problems(Broken)] == ["ifindex", "class_stats", "counters", "link_present"]


def test_the_fake_is_a_datapath_at_run_time():
    assert isinstance(FakeDatapath(), Datapath)
    assert not isinstance(object(), Datapath)


def test_nothing_above_the_datapath_reaches_into_its_tc():
    """The daemon once called service.datapath.tc.link_present() and logged dp.tc.ifindex."""
    root = Path(shaper.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent.name == "datapath":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "tc" and not (
                    isinstance(node.value, ast.Name) and node.value.id == "ipr"):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr") and any(
                    isinstance(a, ast.Attribute) and a.attr == "datapath" for a in node.args):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} (getattr on a datapath)")
    assert offenders == []


def test_the_clsact_hook_is_a_parameter_of_tc_egress_by_default():
    """Issue 14's ingress is a second Tc (and datapath) on the other hook, not an edit of every call."""
    from shaper.datapath import tc

    calls = []

    class Ipr:
        def get_filters(self, ifindex, parent):
            calls.append(("get", parent))
            return []

        def tc(self, command, kind, ifindex, handle, **kw):
            calls.append((command, kw["parent"]))

    def bare(hook: str) -> tc.Tc:  # what Tc.__init__ sets, without a netlink socket
        t = object.__new__(tc.Tc)
        t.ifname, t.ifindex, t.ipr = "shp0", 3, Ipr()
        t.hook, t.filter_parent = hook, tc.HOOK_PARENTS[hook]
        t.has_clsact = lambda: True
        return t

    for hook, parent in (("egress", 0xFFFFFFF3), ("ingress", 0xFFFFFFF2)):
        calls.clear()
        t = bare(hook)
        t.our_filter()
        t.attach_filter(prog_fd=5)
        assert calls == [("get", parent), ("replace-filter", parent)]
    with pytest.raises(ValueError, match="one of egress, ingress"):
        tc.Tc("lo", hook="sideways")
    real = tc.Tc("lo")  # the default, on this namespace's loopback (no root needed to open netlink)
    try:
        assert (real.hook, real.filter_parent) == ("egress", tc.EGRESS_PARENT)
    finally:
        real.close()
