"""Run shaper, SIGKILLing itself after its Nth kernel operation (a test hook, only here).

    python tests/kernel/crashing.py N SPLIT shaper-arguments...

Counts as one kernel operation: writing the intent, clearing it, each operation of
a plan, each piece of an entry batch cut into pieces of at most SPLIT entries
(so a kill can land inside a long trie write, as one during a batch syscall can),
and each piece's host hash write after its trie write.
Nothing of this is in the shaper package: production code has no crash switch.
"""

import os
import signal
import sys

from shaper.core import plan as P
from shaper.datapath.kernel import KernelDatapath

limit, split = int(sys.argv[1]), int(sys.argv[2])
done = 0


def step() -> None:
    global done
    if done >= limit:
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    done += 1


def pieces(op):
    if isinstance(op, P.UpsertEntries):
        items = list(op.entries.items())
        return [P.UpsertEntries(dict(items[i:i + split]), op.direction) for i in range(0, len(items), split)]
    if isinstance(op, P.DeleteEntries):
        return [P.DeleteEntries(op.prefixes[i:i + split], op.direction) for i in range(0, len(op.prefixes), split)]
    return [op]


def wrap(fn):
    def counted(self, *args):
        step()
        return fn(self, *args)
    return counted


execute = KernelDatapath.execute


def execute_stepwise(self, ops):
    for op in ops:
        for piece in pieces(op):
            step()
            execute(self, [piece])


KernelDatapath.execute = execute_stepwise
KernelDatapath.write_intent = wrap(KernelDatapath.write_intent)
KernelDatapath.clear_intent = wrap(KernelDatapath.clear_intent)
# Between an entry batch's trie write and its host hash write (execute asks for the hash
# after writing the trie): a kill there leaves the two apart until the roll-back.
KernelDatapath._hosts = wrap(KernelDatapath._hosts)

if __name__ == "__main__":
    from shaper.cli import main

    sys.argv = ["shaper", *sys.argv[3:]]
    try:
        main()
    finally:
        print(f"crashing: {done} kernel operation(s)", file=sys.stderr)
