"""The launcher's own checks, before any tritonserver starts."""
from __future__ import annotations

import socket

import pytest

from serving.server import ServerError, TritonServer, free_ports


def test_a_port_held_by_another_process_is_refused_by_name(tmp_path):
    """Another server on our HTTP port would answer our readiness checks while tritonserver exits on
    the port it cannot bind: refuse to start instead, naming the port."""
    http, grpc, metrics = free_ports(3)
    with socket.socket() as other:
        other.bind(("127.0.0.1", grpc))
        other.listen()
        server = TritonServer(tmp_path, http, grpc, metrics)
        with pytest.raises(ServerError, match=f"gRPC port 127.0.0.1:{grpc} is not free"):
            server.start()
        assert server.process is None
