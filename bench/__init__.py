"""Benchmarks: shaper against the peers' classification mechanisms and tools, side by side.

`make bench` (python -m bench) runs every section on this machine's kernel in
network namespaces it creates and removes, the netem accuracy section in a VM,
and writes docs/benchmarks.md with its figures under docs/benchmarks/.
"""
