"""Ports a gateway listens on: held by one `bandgate serve` at a time, shared by its serving processes.

`serve --workers N` runs N serving processes that each bind the same port with SO_REUSEPORT, and the
kernel spreads new connections over them. SO_REUSEPORT would as gladly let an unrelated second `serve`
(another supervisor, same user) bind that port and silently take half the connections. So the process
that owns a port locks it first: an `flock` on a file named after the port in a directory of this user's
(`lock_dir`), held by the supervisor, or by a single-process `serve`, for as long as it runs, and
released by the kernel when it exits, however it exits. A second `serve` on the port fails at once with
`PortInUseError`, naming the holder. The serving processes of one supervisor bind without taking the lock.

The lock is keyed by the port alone, not by host and port: "127.0.0.1:50051", "localhost:50051" and
"0.0.0.0:50051" are one port to the kernel, and a key by spelling would let two of them share it. (Two
gateways on one port of two different addresses of one machine are refused too; give them other ports.)
Port 0 (an ephemeral port, tests) has nothing to lock until it is bound: `reserve` resolves it first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

from gateway.config import split_address


class PortInUseError(OSError):
    """Another `bandgate serve` holds the lock of a port this one would listen on."""


def lock_dir() -> Path:
    """Where port locks live: $XDG_RUNTIME_DIR/bandgate, else bandgate-UID in the temp dir. Per user,
    because the kernel never lets two users share a port through SO_REUSEPORT anyway."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(runtime) / "bandgate" if runtime else Path(tempfile.gettempdir()) / f"bandgate-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        # another user made it (a shared /tmp): they could hold or remove our locks
        raise PermissionError(f"{path}: the port lock directory is not this user's alone")
    return path


class PortLocks:
    """The locks of the ports in `addresses` (HOST:PORT; port 0 and empty addresses are skipped).

    acquire/release: acquire takes every lock or none (PortInUseError, naming the holder's pid and address);
    release lets them go, safe without acquire and twice. A lock file is left behind on purpose: removing
    it would race another process that has just opened it."""

    def __init__(self, addresses: Iterable[str], directory: Path | None = None):
        self.addresses = [a for a in addresses if a and split_address(a)[1] != 0]
        self.directory = directory
        self._held: list[int] = []

    def acquire(self) -> None:
        if self._held:
            return
        directory = self.directory or lock_dir()
        try:
            for address in self.addresses:
                port = split_address(address)[1]
                path = directory / f"port-{port}.lock"
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    raise PortInUseError(
                        f"port {port} ({address}) is held by another bandgate serve "
                        f"({holder}); stop it, or give this one another port"
                    ) from None
                self._held.append(fd)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"pid": os.getpid(), "address": address}).encode(), 0)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        held, self._held = self._held, []
        for fd in held:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> PortLocks:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    """What the lock file says of the process holding it: 'pid 123 on 127.0.0.1:50051'."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        held = json.loads(os.pread(fd, 4096, 0))
        return f"pid {held['pid']} on {held['address']}"
    return "pid unknown"


def reserve(address: str) -> tuple[socket.socket, str]:
    """A socket bound to `address` with SO_REUSEPORT and never listening, so it takes no connection, and
    the address with its port resolved (port 0: an ephemeral one). Held while serving processes come and
    go, it keeps the port from being taken by anything that binds without SO_REUSEPORT."""
    host, port = split_address(address)
    family, kind, proto, _, where = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(where)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"{address}: {e.strerror}") from None
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    return sock, f"{address.rpartition(':')[0]}:{bound}"
