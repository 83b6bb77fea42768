"""Kubernetes: the mutating admission webhook that injects the sidecar.
Imports: shaper.http, shaper.core, shaper.errors.
"""
