"""Helpers for tests against NATS: the shared JetStream server (127.0.0.1:4222), a private nats-server from
the installed binary (own port, own encrypted store dir, per-family users) that a test may stop and
start, and readers of what a stream holds.

A missing service skips its tests saying why; under CI=true it fails them instead (`require`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest

from decoder.records import FAMILIES
from gateway.stream.base import MSG_ID_HEADER, records_of
from gateway.stream.nats import stream_name

SHARED = os.environ.get("BANDGATE_TEST_NATS", "nats://127.0.0.1:4222")
SERVER_BINARY = shutil.which("nats-server") or "/usr/sbin/nats-server"
GATEWAY_USER = "gateway"


def require(ok: bool, why: str) -> None:
    """Skip the test, saying `why`, unless `ok`; under CI=true fail it instead: a CI run must not pass
    by skipping what it was meant to test."""
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {why}")
    pytest.skip(why)


def _info(host: str, port: int) -> dict | None:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            line = s.makefile("rb").readline()
    except OSError:
        return None
    if not line.startswith(b"INFO "):
        return None
    return json.loads(line[5:])


def shared_nats() -> str:
    """The shared NATS URL, after checking it answers with JetStream on (else skip, or fail under CI)."""
    hostport = SHARED.removeprefix("nats://").rpartition("@")[2]
    host, _, port = hostport.rpartition(":")
    info = _info(host, int(port))
    require(info is not None, f"no NATS at {SHARED} (set BANDGATE_TEST_NATS, or start nats-server -js)")
    require(bool(info and info.get("jetstream")), f"NATS at {SHARED} runs without JetStream (-js)")
    return SHARED


def unique_prefix() -> str:
    """A stream prefix no other test (or run) uses: tests share the server."""
    return "t" + secrets.token_hex(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateNats:
    """A nats-server of the test's own: `users` maps a user name to its permissions (None: everything);
    each gets a random password. JetStream stores in `tmp_path/js`, encrypted (AES) with a random key."""

    def __init__(self, tmp_path: Path, users: Mapping[str, dict | None] | None = None):
        require(Path(SERVER_BINARY).exists(), f"no nats-server binary at {SERVER_BINARY}")
        self.dir = tmp_path
        self.store_dir = tmp_path / "js"
        self.port = free_port()
        self.passwords = {u: secrets.token_hex(8) for u in {GATEWAY_USER: None, **(users or {})}}
        entries = []
        for user, perms in {GATEWAY_USER: None, **(users or {})}.items():
            entry: dict[str, Any] = {"user": user, "password": self.passwords[user]}
            if perms is not None:
                entry["permissions"] = perms
            entries.append(entry)
        self.key = secrets.token_hex(16)
        self.config = tmp_path / "nats.conf"
        self.config.write_text(
            json.dumps(
                {
                    "listen": f"127.0.0.1:{self.port}",
                    "jetstream": {"store_dir": str(self.store_dir), "cipher": "aes", "key": self.key},
                    "authorization": {"users": entries},
                },
                indent=1,
            )
        )
        self.log = tmp_path / "nats.log"
        self.proc: subprocess.Popen | None = None

    def url(self, user: str = GATEWAY_USER) -> str:
        return f"nats://{user}:{self.passwords[user]}@127.0.0.1:{self.port}"

    def start(self) -> PrivateNats:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [SERVER_BINARY, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            info = _info("127.0.0.1", self.port)
            if info is not None:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"nats-server did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop it (SIGTERM: a clean shutdown, its store kept); safe when stopped."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> PrivateNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def stream_messages(url: str, prefix: str, family: str) -> list[tuple[str, str, dict]]:
    """(subject, `<message ID>#<index>`, record) of every record in the messages `family`'s stream holds,
    in order: a record twice in the stream (in one message republished, or in two) shows twice."""
    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        name = stream_name(prefix, family)
        try:
            info = await jsm.stream_info(name)
        except nats.js.errors.NotFoundError:
            return []
        out = []
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    msg = await jsm.get_msg(name, seq)
                except nats.js.errors.NotFoundError:
                    continue  # purged or deleted
                msg_id = (msg.headers or {}).get(MSG_ID_HEADER, "")
                out += [(msg.subject, f"{msg_id}#{i}", r) for i, r in enumerate(records_of(msg.data))]
        return out
    finally:
        await nc.close()


async def raw_messages(url: str, prefix: str) -> list[bytes]:
    """Every message of every family stream under `prefix` as bytes: subject, headers and payload."""
    nc = await nats.connect(url)
    out = []
    try:
        jsm = nc.jsm()
        for family in FAMILIES:
            try:
                info = await jsm.stream_info(stream_name(prefix, family))
            except nats.js.errors.NotFoundError:
                continue
            for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    msg = await jsm.get_msg(stream_name(prefix, family), seq)
                    out.append(msg.subject.encode() + repr(msg.headers).encode() + msg.data)
    finally:
        await nc.close()
    return out


async def all_messages(url: str, prefix: str) -> list[tuple[str, str, dict]]:
    out = []
    for family in FAMILIES:
        out += await stream_messages(url, prefix, family)
    return out


async def delete_streams(url: str, prefix: str) -> None:
    """Delete every family stream under `prefix` (tests share the server: leave nothing behind)."""
    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        for family in FAMILIES:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await jsm.delete_stream(stream_name(prefix, family))
    finally:
        await nc.close()


def record_of(body: dict) -> dict:
    """A streamed record as the store's record (without its cursor)."""
    return {k: body[k] for k in ("family", "device", "start_us", "duration_s", "algo", "values")}


def run(coro: Any, timeout_s: float = 120.0) -> Any:
    """`coro` to completion, failing after `timeout_s` (a hang reports where it was, not a CI timeout)."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))
