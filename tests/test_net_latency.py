"""Per-call HTTP latency: our servers turn Nagle off, and `asyncopd bench latency` measures the calls a run makes."""

import json
import socket

import pytest
import requests

from asyncopd.cli.main import main
from asyncopd.net.server import ServerThread, make_app


def test_accepted_connections_have_tcp_nodelay():
    """Without TCP_NODELAY, Nagle's algorithm holds a response's last segment until the client's delayed ACK
    (~40 ms) on every call after the first on a kept-alive connection."""
    server = ServerThread(make_app("nodelay")).start()
    try:
        with requests.Session() as session:
            assert session.get(server.url + "/absent", timeout=10).status_code == 404  # the connection stays open
            # the server side of that connection: uvicorn's protocol objects hold the accepted sockets
            socks = [c.transport.get_extra_info("socket") for c in list(server._server.server_state.connections)]
            assert len(socks) == 1
            assert socks[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.stop()


@pytest.mark.e2e
def test_bench_latency_writes_every_call(tmp_path, capsys):
    assert main(["bench", "latency", "--requests", "3", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "latency.json").read_text())
    assert saved["requests"] == 3 and saved["cpus"] >= 1 and saved["load_average_1min"] >= 0
    assert [c["call"] for c in saved["calls"]] == ["health", "generate", "score", "weight_update"]
    for c in saved["calls"]:
        assert c["n"] == len(c["samples_ms"]) == 3
        assert 0 < min(c["samples_ms"]) and c["p50_ms"] <= c["p99_ms"] <= c["max_ms"] == max(c["samples_ms"])
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert "weight_update" in capsys.readouterr().out
