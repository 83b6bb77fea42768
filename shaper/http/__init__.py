"""HTTP: the rule API (`api`, its schema `openapi`), the strict server the daemon and the
webhook run on (`server`), and the client the CLI uses (`client`).
Imports: shaper.control, shaper.core, shaper.errors.
"""
