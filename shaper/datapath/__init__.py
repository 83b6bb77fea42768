"""The datapath: everything that touches the kernel, behind one interface (`interface.Datapath`).

`abi` is the map layout shared with bpf/shaper.h; `tc` (pyroute2) makes the clsact hook, the
HTB tree and its netem leaves, `tcdump` decodes tc dumps, `netem` encodes netem options, `maps`
is the bpf(2) map access (libbpf), `loader` compiles and pins the classifier in a child
process (bcc), `kernel` is the real datapath, `fake` the in-memory one the tests use.
Imports: shaper.core and shaper.errors.
"""
