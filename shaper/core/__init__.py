"""The pure core: what a rule is and what must change in the kernel to get there.

No I/O, no kernel, no HTTP: `units` parses and formats quantities, `model` is the rule and
its validation, `plan` turns the rules in place and the rules wanted into datapath operations
and slot assignments, `changes` words a plan for --dry-run, `stats` is the counters' shape.
Everything here is tested without root.  Imports: only shaper.errors.
"""
