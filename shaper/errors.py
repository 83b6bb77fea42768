"""The exceptions shaper raises: one base, and classes that say what to do.

InvalidInput is the caller's to fix (CLI exit 2, HTTP 400/422) and names the
field and the accepted form.  KernelError names the operation, the object and,
where there is one, what to install or change.  `retryable` tells an API or a
loop whether trying again can help (kopf's TemporaryError/PermanentError).
"""

from __future__ import annotations

import errno as _errno
import os


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class ShaperError(Exception):
    """Base of every error shaper raises on purpose."""

    exit_code = 1
    retryable = False


class InvalidInput(ShaperError):
    """A rule or rule set that cannot be applied; nothing was changed."""

    exit_code = 2

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


class NotSupported(ShaperError):
    """Something shaper needs is missing on this host (a qdisc, headers, bpffs)."""


class PermissionDenied(ShaperError):
    """The process lacks a capability it needs (CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN)."""


class Conflict(ShaperError):
    """The interface holds state shaper did not create, or another controller owns it."""
