"""Every exception shaper raises on purpose, and its policy, in one place.

Each class carries what its callers do with it: `exit_code` (the CLI's exit status),
`http_status` (the API's answer; the API maps nothing else) and `retryable` (whether
trying the same thing again can help: the daemon's interface loop retries those quietly at
the next tick, and a failed attach for any other reason after a warning and a back-off).

| class            | exit | HTTP | meaning                                                   |
|------------------|------|------|-----------------------------------------------------------|
| ShaperError      | 1    | 500  | the base; a failure with nothing more specific to say     |
| InvalidInput     | 2    | 422  | the caller's to fix: names the field and the accepted form |
| BadJson          | 2    | 400  | a body that is not one JSON object (or has a key twice)   |
| NotFound         | 1    | 404  | no such rule                                              |
| Unauthorized     | 1    | 401  | a request that needs the token (the agent's look-ups)     |
| NotReady         | 1    | 503  | the classifier is not attached (yet, or any more)         |
| Conflict         | 1    | 409  | state shaper did not create, or another controller's      |
| NotSupported     | 1    | 501  | this host lacks something (sch_netem, headers, bpffs)     |
| PermissionDenied | 1    | 500  | the process lacks a capability                            |
| KernelError      | 1    | 500  | the kernel refused an operation (retryable: EBUSY/EAGAIN/EINTR) |
| ApiError         | 1/2  | its own | a daemon's error answer, seen by the client            |

InvariantBroken is deliberately not a ShaperError: the fake datapath raises it when a plan
would leave the kernel inconsistent, a bug that must fail a test, never be reported as a
refusal.
"""

from __future__ import annotations

import errno as _errno
import os


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class ShaperError(Exception):
    """Base of every error shaper raises on purpose."""

    exit_code = 1
    http_status = 500
    retryable = False


class InvalidInput(ShaperError):
    """A rule or rule set that cannot be applied; nothing was changed."""

    exit_code = 2
    http_status = 422

    def __init__(self, field: str, problem: str, accepted: str | None = None):
        # Both quote the caller's input back: keep a hostile 30 MB value out of
        # responses and logs.
        field, problem = _cut(field, 100), _cut(problem, 300)
        self.field = field
        self.problem = problem
        self.accepted = accepted
        text = f"{field}: {problem}"
        if accepted:
            text += f" (expected {accepted})"
        super().__init__(text)


class BadJson(InvalidInput):
    """A request body that is not valid JSON, not an object, or has a key twice."""

    http_status = 400


class NotFound(ShaperError):
    """No rule of that name."""

    http_status = 404


class Unauthorized(ShaperError):
    """A request that needs the bearer token: the node agent looks for a target not shaped yet only
    for a caller holding it (a look-up reads /proc and asks container runtimes)."""

    http_status = 401


class NotReady(ShaperError):
    """The datapath is not attached: the daemon is starting, or its interface is gone."""

    http_status = 503


class KernelError(ShaperError):
    """The kernel refused an operation."""

    def __init__(self, op: str, obj: str, err: int | None = None, hint: str | None = None):
        self.op = op
        self.obj = obj
        self.errno = err
        self.hint = hint
        text = f"{op} {obj} failed"
        if err is not None:
            text += f": {os.strerror(err)} ({_errno.errorcode.get(err, err)})"
        if hint:
            text += f"; {hint}"
        super().__init__(text)
        self.retryable = err in (_errno.EBUSY, _errno.EAGAIN, _errno.EINTR)


class DumpError(KernelError):
    """The kernel answered a tc dump with an error (tcdump's decoder; tc names the interface)."""

    def __init__(self, err: int):
        super().__init__("dump", "tc objects", err)


class NotSupported(ShaperError):
    """Something shaper needs is missing on this host (a qdisc, headers, bpffs)."""

    http_status = 501


class PermissionDenied(ShaperError):
    """The process lacks a capability it needs (CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN)."""


class Conflict(ShaperError):
    """The interface holds state shaper did not create, or another controller owns it."""

    http_status = 409


class ApiError(ShaperError):
    """An error answer from a daemon, as the client sees it: its status, its message."""

    def __init__(self, status: int, message: str, field: str | None = None):
        self.status = self.http_status = status
        self.exit_code = 2 if status in (400, 413, 422) else 1
        self.field = field  # the field of the request the daemon refused, where it named one
        super().__init__(message)


class InvariantBroken(AssertionError):
    """The fake datapath's check failed: a plan would leave the kernel inconsistent (a bug)."""
