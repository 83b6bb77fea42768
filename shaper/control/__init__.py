"""Control: keep the datapath in step with the rules asked for.

`controller` plans a change and executes it on a datapath with crash-safe undo, `service` is
the operations the API and the daemon offer (locking, TTL expiry, audit log), `metrics` the
Prometheus view.  Imports: shaper.datapath's interface, shaper.core, shaper.errors.
"""
