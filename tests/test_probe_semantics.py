"""What counts as a lost server: no answer at all. A deadline that passed, or SGLang's 503 while it is paused for a
weight update, comes from a live server, and restarting it would throw its work away."""

import http.server
import threading
import time

import pytest

from asyncopd.config.schema import SupervisionConfig
from asyncopd.net.actor import ServiceHost
from asyncopd.net.client import HttpClient, ServerError, transient, unanswered


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/slow":
            time.sleep(1.0)
        # SGLang while paused: its generating probe waits, then answers 503; a broken server answers 500
        status = {"/health_generate": 503, "/broken": 500}.get(self.path, 200)
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_a_deadline_is_not_a_lost_server_but_a_refused_connection_is(server):
    with pytest.raises(ServerError) as e:
        HttpClient(server.url, timeout_s=0.2).request("GET", "/slow")
    assert e.value.timed_out and not unanswered(e.value) and transient(e.value)  # retry elsewhere, restart nothing
    assert "rollout.request_timeout_s" in str(e.value)
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(ServerError) as e:
        HttpClient(f"http://127.0.0.1:{port}", timeout_s=0.2).request("GET", "/health")
    assert unanswered(e.value) and not e.value.timed_out


def test_a_paused_sglang_answering_503_to_its_probe_is_alive(server):
    class _Served:
        url, alive = server.url, True

    host = ServiceHost("unused", type("Cfg", (), {"api_key": ""})(), SupervisionConfig(health_timeout_s=5))
    host.server = _Served()
    host.probe_paths = ("/health_generate",)
    assert host.probe()  # 503: SGLang paused for an update, or starting
    host.probe_paths = ("/broken",)
    assert not host.probe()  # a 500 is a failed probe: restarted after supervision.health_failures of them
