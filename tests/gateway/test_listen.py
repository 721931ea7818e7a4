"""Port locks and reservations (gateway/listen.py): one `serve` a port, its serving processes sharing it."""

from __future__ import annotations

import os
import socket

import pytest

from gateway.listen import PortInUseError, PortLocks, lock_dir, reserve


def _bind(address: tuple[str, int], *, reuse_port: bool) -> socket.socket:
    sock = socket.socket()
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def test_a_second_holder_of_a_port_is_refused_and_told_who_holds_it(tmp_path):
    first = PortLocks(["127.0.0.1:50999", "127.0.0.1:51000"], directory=tmp_path)
    first.acquire()
    # another spelling of the same port: the lock is the port's, not the text's
    with pytest.raises(PortInUseError, match=rf"port 51000 .*pid {os.getpid()} on 127.0.0.1:51000"):
        PortLocks(["localhost:51001", "0.0.0.0:51000"], directory=tmp_path).acquire()
    # all or none: the refused one let go of 51001 again
    with PortLocks(["127.0.0.1:51001"], directory=tmp_path):
        pass
    first.release()
    first.release()  # twice is safe
    with PortLocks(["0.0.0.0:51000"], directory=tmp_path):
        pass


def test_port_zero_and_empty_addresses_lock_nothing(tmp_path):
    with PortLocks(["127.0.0.1:0", ""], directory=tmp_path), PortLocks(["127.0.0.1:0"], directory=tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []


def test_the_lock_directory_is_this_users_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert lock_dir() == tmp_path / "bandgate"
    assert (tmp_path / "bandgate").stat().st_mode & 0o777 == 0o700
    (tmp_path / "bandgate").chmod(0o777)  # as a shared directory another user could write in
    with pytest.raises(PermissionError, match="not this user's alone"):
        lock_dir()


def test_a_reservation_resolves_port_zero_shares_with_reuseport_and_takes_no_connection():
    sock, address = reserve("127.0.0.1:0")
    try:
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        with pytest.raises(OSError):  # a gateway without SO_REUSEPORT cannot take it
            _bind((host, int(port)), reuse_port=False)
        with pytest.raises(ConnectionRefusedError):  # bound, never listening: no connection lands here
            socket.create_connection((host, int(port)), timeout=2)
        serving = _bind((host, int(port)), reuse_port=True)  # a serving process of the supervisor
        serving.listen()
        with socket.create_connection((host, int(port)), timeout=2):
            pass
        serving.close()
    finally:
        sock.close()


def test_a_reservation_of_a_port_in_use_names_the_address():
    taken = _bind(("127.0.0.1", 0), reuse_port=False)
    taken.listen()
    try:
        with pytest.raises(OSError, match=rf"127.0.0.1:{taken.getsockname()[1]}"):
            reserve(f"127.0.0.1:{taken.getsockname()[1]}")
    finally:
        taken.close()
