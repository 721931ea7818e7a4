"""Plaintext only on loopback, and only when asked: `bandgate serve --insecure` on a non-loopback address,
or a plaintext health listener on one, exits non-zero at start with the reason and opens nothing;
`--insecure` on 127.0.0.1 serves plaintext with a warning in its log; without it, `serve` speaks TLS (a
plaintext client gets UNAVAILABLE) and `bandgate health` still reaches the plaintext loopback health
listener."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from gateway.pipeline import OK
from tests.gateway.gatewaykit import REPO, SERVE, ServeProcess, Uploader, band, processed, stored

ENV = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'protos'}"}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))  # a hang bound, not a speed check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this machine (IPv4 and IPv6), from /proc/net."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def test_listening_ports_sees_a_listener():
    """The probe the refusals below rely on sees a port that is listening, and not one that is not."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert port in listening_ports()
    assert port not in listening_ports()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--insecure", "--listen", "0.0.0.0:{main}"), ("loopback", "0.0.0.0")),
        (("--insecure", "--listen", "[::]:{main}"), ("loopback", "[::]")),
        (
            ("--listen", "127.0.0.1:{main}", "--health-listen", "0.0.0.0:{health}"),
            ("health_listen", "loopback"),
        ),
    ],
    ids=["insecure-on-0.0.0.0", "insecure-on-[::]", "health-on-0.0.0.0"],
)
def test_plaintext_off_loopback_exits_non_zero_at_start_naming_why_and_opens_nothing(tmp_path, flags, named):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to see listening ports")
    ports = {"main": free_port(), "health": free_port(), "token": free_port()}
    argv = [
        *SERVE,
        "--store",
        f"sqlite:///{tmp_path / 'gw.db'}",
        "--state-dir",
        str(tmp_path / "state"),
        "--token-listen",
        f"127.0.0.1:{ports['token']}",
        "--health-listen",
        f"127.0.0.1:{ports['health']}",
        *(f.format(**ports) for f in flags),  # argparse: the last --health-listen wins
    ]
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    opened: set[int] = set()
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:  # watch every port for as long as it lives
        opened |= listening_ports() & set(ports.values())
        time.sleep(0.005)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode not in (0, None), (out, err)
    for word in named:
        assert word in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err  # one line, for a person
    assert '"event":"serving"' not in err and not out
    assert not opened
    assert not (tmp_path / "state").exists() and not (tmp_path / "gw.db").exists()


def log_events(server: ServeProcess) -> list[dict]:
    return [json.loads(line) for line in server.lines if line.startswith("{")]


def test_insecure_on_loopback_serves_plaintext_with_a_warning(tmp_path):
    db = tmp_path / "gw.db"
    server = ServeProcess(tmp_path, db, extra=("--insecure",))
    device, batches = band()
    try:

        async def scenario():
            async with grpc.aio.insecure_channel(server.address) as ch:
                up = Uploader(ch, device)  # identified by the device it claims: development only
                acks = [await up.send(b) for b in batches[:2]]
                assert await up.close() == grpc.StatusCode.OK
            async with grpc.aio.secure_channel(server.address, grpc.ssl_channel_credentials()) as ch:
                up = Uploader(ch, device)
                with pytest.raises(grpc.aio.AioRpcError):
                    await up.send(batches[2])
                tls_code = await up.call.code()
            return acks, tls_code

        acks, tls_code = run(scenario())
        events = log_events(server)
    finally:
        assert server.terminate() == 0
    assert [a.code for a in acks] == [OK, OK]
    assert tls_code == grpc.StatusCode.UNAVAILABLE  # plaintext only: there is no TLS on this port
    assert stored(f"sqlite:///{db}") == processed(batches[:2])
    serving = next(e for e in events if e.get("event") == "serving")
    assert serving["tls"] is False and serving["address"].startswith("127.0.0.1:")
    warnings = [
        e for e in events if e["level"] == "warning" and e.get("event") in ("insecure", "insecure_auth")
    ]
    assert {e["event"] for e in warnings} == {"insecure", "insecure_auth"}
    assert all("loopback" in e["msg"] for e in warnings)
    assert "PLAINTEXT" in next(e["msg"] for e in warnings if e["event"] == "insecure")


def test_default_serve_speaks_tls_and_health_answers_in_plaintext_on_loopback(tmp_path):
    db = tmp_path / "gw.db"
    server = ServeProcess(tmp_path, db)
    device, batches = band()
    try:

        async def scenario():
            async with grpc.aio.insecure_channel(server.address) as ch:
                up = Uploader(ch, device)
                with pytest.raises(grpc.aio.AioRpcError):
                    await up.send(batches[0])
                plaintext = await up.call.code(), await up.call.details()
            async with await server.credentials.band_channel(device) as ch:
                up = Uploader(ch, device)
                ack = await up.send(batches[0])
                assert await up.close() == grpc.StatusCode.OK
            return plaintext, ack

        plaintext, ack = run(scenario())
        health = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "health", "--target", server.health_address],
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=30,
        )
        events = log_events(server)
    finally:
        assert server.terminate() == 0
    assert plaintext[0] == grpc.StatusCode.UNAVAILABLE, plaintext
    assert ack.code == OK
    assert stored(f"sqlite:///{db}") == processed(batches[:1])
    assert health.returncode == 0, (health.stdout, health.stderr)
    assert "SERVING" in health.stdout
    serving = next(e for e in events if e.get("event") == "serving")
    assert serving["tls"] is True and serving["health_address"].startswith("127.0.0.1:")
    assert not [e for e in events if e["level"] == "warning" and "insecure" in e.get("event", "")]
