"""shaper: per-destination network shaping (eBPF LPM classifier -> HTB -> netem)."""

__version__ = "0.1.0"
