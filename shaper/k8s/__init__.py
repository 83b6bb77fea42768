"""Kubernetes: the mutating admission webhook that injects the sidecar, and kubelet's
bandwidth annotations as rules (bandwidth.py, read by `shaper run --pod-bandwidth`).
Imports: shaper.http, shaper.core, shaper.errors.
"""
