"""The daemon's HTTP adapter and helpers, driven over a socketpair (no network, no root)."""

import json
import logging
import socket
import threading

import pytest

from shaper.api import MAX_BODY_BYTES, Api
from shaper.errors import InvalidInput
from shaper.fake import FakeDatapath
from shaper.server import JsonFormatter, _Handler, check_exposure, parse_listen
from shaper.service import Service


@pytest.mark.parametrize("text,expected", [
    (":2332", ("", 2332)), ("2332", ("", 2332)), ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("[::1]:2332", ("::1", 2332)), ("[::]:0", ("::", 0)), ("localhost:9", ("localhost", 9)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", ":", "host:", ":99999", "::1:2332", "a:b"])
def test_parse_listen_refuses(text):
    with pytest.raises(InvalidInput) as exc:
        parse_listen(text)
    assert exc.value.field == "--listen"


def test_json_log_lines_carry_the_fields():
    record = logging.LogRecord("shaper", logging.INFO, __file__, 1, "rule.put", (), None)
    record.fields = {"who": "10.0.0.9", "rule": "a", "result": "ok"}
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "rule.put" and line["level"] == "info" and line["who"] == "10.0.0.9"
    assert line["ts"].endswith("Z")


class _FakeServer:
    def __init__(self, api):
        self.api = api


def exchange(raw: bytes) -> tuple[int, dict, bytes]:
    """Send raw bytes to one _Handler over a socketpair; return status, headers, body."""
    fake = FakeDatapath()
    service = Service(fake, "eth0", clock=lambda: 10**12)
    service.start()
    server = _FakeServer(Api(service))
    ours, theirs = socket.socketpair()
    t = threading.Thread(target=_Handler, args=(theirs, ("10.0.0.9", 1234), server))
    t.start()
    ours.sendall(raw)
    ours.shutdown(socket.SHUT_WR)
    t.join(10)
    theirs.close()  # the server, not the handler, closes the connection
    data = b""
    while chunk := ours.recv(65536):
        data += chunk
    ours.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_handler_serves_json_with_a_length():
    body = json.dumps({"dst": ["10.0.0.1"], "delay": "5ms"}).encode()
    status, headers, out = exchange(b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                                    b"Connection: close\r\n\r\n%s" % (len(body), body))
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(out) and json.loads(out)["delay"] == "5ms"
    assert headers["Server"].startswith("shaper/")


def test_handler_refuses_oversized_and_chunked_bodies():
    status, headers, out = exchange(b"PUT /rules HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                                    % (MAX_BODY_BYTES + 1))
    assert status == 413 and "exceeds" in json.loads(out)["error"] and headers["Connection"] == "close"
    status, _, out = exchange(b"PUT /rules HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert status == 411
    status, _, out = exchange(b"PUT /rules HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    assert status == 400


def test_handler_head_has_no_body():
    status, headers, out = exchange(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 405 and out == b""


def test_an_open_api_beyond_loopback_needs_a_token_or_insecure():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.53"):
        check_exposure(host, None, False)
    for host in ("", "0.0.0.0", "::", "10.0.0.5", "fd00::1", "pod.example"):
        with pytest.raises(InvalidInput) as exc:
            check_exposure(host, None, False)
        assert "--insecure" in str(exc.value) and "--token-file" in str(exc.value)
        check_exposure(host, "t0ken", False)
        check_exposure(host, None, True)


def test_any_other_method_gets_the_apis_405_not_an_html_501():
    for method in (b"TRACE", b"OPTIONS", b"PROPFIND"):
        status, headers, out = exchange(method + b" /rules HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 405 and headers["Allow"] == "DELETE, GET, PUT" and json.loads(out)["error"]
