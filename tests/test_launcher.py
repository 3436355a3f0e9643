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


def test_allocator_choice_is_checked_before_starting(monkeypatch, tmp_path):
    """--malloc: an unknown allocator or a missing library is a clear error naming what to install,
    raised before any process starts; the system allocator adds nothing to the environment."""
    from serving import server as launcher

    assert launcher.allocator_library("system") is None
    with pytest.raises(ServerError, match="unknown allocator 'hoard'"):
        launcher.allocator_library("hoard")
    monkeypatch.setitem(launcher.ALLOCATORS, "jemalloc", "libjemalloc-not-here.so.9")
    with pytest.raises(ServerError, match="apt-get install libjemalloc2"):
        TritonServer(tmp_path, malloc="jemalloc").start(tmp_path / "work")
