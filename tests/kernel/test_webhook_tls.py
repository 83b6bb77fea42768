"""`shaper webhook` over TLS in a namespace, under connection pressure: clients that connect
and never speak (no ClientHello) block no other client."""

import http.client
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import k8s_pods as K  # noqa: E402

from shaper.lab import ROOT, netns_connect, sh, wait_until  # noqa: E402

HOST = "shaper-webhook.shaper-system.svc"


def test_idle_tls_clients_cannot_stop_the_webhook(lab, tmp_path):
    certs = tmp_path / "tls"
    sh("bash", str(ROOT / "deploy" / "secrets.sh"), str(certs), str(tmp_path / "token"))
    log = open(tmp_path / "webhook.log", "w")
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{lab.pod}", sys.executable, "-m", "shaper", "webhook",
                             "--listen", "127.0.0.1:8443", "--tls-cert", str(certs / "tls.crt"), "--tls-key",
                             str(certs / "tls.key"), "--image", "shaper:test"], stdout=log, stderr=log, cwd=ROOT)
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))

    def inject() -> int:
        conn = http.client.HTTPSConnection(HOST, 8443, context=ctx, timeout=5)
        conn.sock = ctx.wrap_socket(netns_connect(lab.pod, "127.0.0.1", 8443, 5), server_hostname=HOST)
        try:
            conn.request("POST", "/inject", body=json.dumps(K.review(K.deployment_pod())).encode())
            return conn.getresponse().status
        finally:
            conn.close()

    def answers() -> bool:
        try:
            return inject() == 200
        except OSError:
            return False

    idle: list[socket.socket] = []
    try:
        assert wait_until(answers, 30, 0.2), (tmp_path / "webhook.log").read_text()
        idle = [netns_connect(lab.pod, "127.0.0.1", 8443, 5) for _ in range(100)]
        time.sleep(0.5)  # 100 clients that never start their handshake
        started = time.monotonic()
        assert inject() == 200  # served at once beside them
        assert time.monotonic() - started < 2
        for s in idle:
            s.close()
        idle.clear()
        assert proc.poll() is None
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(10)
        log.close()
