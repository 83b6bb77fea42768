"""How a request names a target of the node agent (pure: no /proc, no kernel).

A target is another workload's network namespace, named by what a test harness knows:

  10.244.1.7, fd00::7, ip:10.244.1.7   the pod (or container) holding that address
  pid:4242                             the namespace of a process (as the node sees its PIDs)
  netns:NAME, netns:/path              a name from `ip netns list`, or a namespace file: only
                                       /run/netns/NAME or /proc/PID[/task/TID]/ns/net
  inode:4026532301                     a namespace by its inode (what GET /targets shows as netns)
  container:NAME_OR_ID, NAME           a container, asked of the runtimes present (podman, crictl)
  podman:NAME_OR_ID, cri:NAME_OR_ID    a container, asked of that runtime only (cri: CRI-O, containerd)

A spec is what the agent resolves (shaper.agent.discover); the namespace it finds is the
target's identity, so one pod named by its IP and by its container is one target.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass

from shaper.errors import InvalidInput

KINDS = ("ip", "pid", "netns", "inode", "container", "podman", "cri")
FORMS = ("a pod IP (10.244.1.7, fd00::7), pid:PID, netns:NAME, netns:/proc/PID/ns/net, inode:INODE, "
         "container:NAME_OR_ID (or the name alone), podman:NAME_OR_ID or cri:NAME_OR_ID")
# The namespace files a request may name: the agent is root with the node's PIDs, and any other
# path would have it open (and a reader learn of) any file on the node or in any container.
_NETNS_PATH = re.compile(r"^(/var)?/run/netns/[A-Za-z0-9_.-]{1,255}$|^/proc/[1-9][0-9]{0,9}(/task/[1-9][0-9]{0,9})?"
                         r"/ns/net$")
# What a container runtime accepts as a name or an id (podman's and CRI's names are narrower still).
_CONTAINER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")
_NETNS_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")
MAX_SPEC = 4096


@dataclass(frozen=True)
class TargetSpec:
    kind: str
    value: str

    def __str__(self) -> str:
        return self.value if self.kind == "ip" else f"{self.kind}:{self.value}"


def parse_target(text: str) -> TargetSpec:
    """The spec of a target as a request gives it; InvalidInput (422) naming the forms if it is none of them."""
    if not isinstance(text, str) or not text or len(text) > MAX_SPEC:
        raise InvalidInput("target", "is empty or too long", FORMS)
    kind, sep, value = text.partition(":")
    if sep and kind in KINDS:
        if not value:
            raise InvalidInput("target", f"{text!r} names no {kind}", FORMS)
    else:  # no known prefix: an address (IPv6 has colons), or a container's name
        kind, value = ("ip", text) if _is_ip(text) else ("container", text)
        if kind == "container" and (_digits(text) or ":" in text):
            raise InvalidInput("target", f"{text!r} is neither an address nor a container name "
                               "(a PID is written pid:PID)", FORMS)
    if kind == "ip":
        if not _is_ip(value):
            raise InvalidInput("target", f"{value!r} is not an IPv4 or IPv6 address", FORMS)
        addr = ipaddress.ip_address(value)
        if addr.is_loopback or addr.is_unspecified or addr.is_multicast:
            raise InvalidInput("target", f"{value} is a loopback, unspecified or multicast address: it names no pod",
                               "a pod's own address")
        value = str(addr)  # one spelling per address: fd00::07 and fd00::7 are one target
    elif kind == "pid":
        if not _digits(value) or not 0 < int(value) < 2 ** 22 + 1:
            raise InvalidInput("target", f"pid:{value} is not a process id", "pid:PID, e.g. pid:4242")
        value = str(int(value))
    elif kind == "inode":
        if not _digits(value) or not 0 < int(value) < 2 ** 32:
            raise InvalidInput("target", f"inode:{value} is not a namespace inode", "inode:4026532301")
        value = str(int(value))
    elif kind == "netns":
        if value.startswith("/"):
            if not _NETNS_PATH.match(value) or posixpath.normpath(value) != value:
                raise InvalidInput("target", f"netns:{value} is not a namespace file the agent opens",
                                   "netns:/run/netns/NAME or netns:/proc/PID/ns/net")
        elif not _NETNS_NAME.match(value) or value in (".", ".."):
            raise InvalidInput("target", f"netns:{value} is not a namespace name", "a name listed by `ip netns list`")
    elif not _CONTAINER.match(value):
        raise InvalidInput("target", f"{kind}:{value} is not a container name or id", FORMS)
    return TargetSpec(kind, value)


def _digits(text: str) -> bool:
    """ASCII digits only ("²".isdigit() is true, and int() refuses it)."""
    return text.isascii() and text.isdigit()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
