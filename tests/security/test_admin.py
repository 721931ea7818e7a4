"""The admin API is for admin credentials only, and the admin operation carries no data by itself: against
the real gateway over real TLS on loopback. Then `bandgate admin` end to end against a `bandgate serve`
process, and the audit log it leaves behind (`bandgate audit verify` / `show`)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc

from bandgate.v1 import admin_pb2, admin_pb2_grpc, features_pb2, features_pb2_grpc
from gateway.pipeline import OK
from gateway.security.client import ClientIdentity
from gateway.security.pki import Identity, key_pem, make_csr, new_key
from gateway.server import run_server
from gateway.store import open_store
from tests.gateway.gatewaykit import (
    REPO,
    Credentials,
    ServeProcess,
    Uploader,
    audit_name,
    band,
    stored,
    tls_config,
)

CLI = (sys.executable, "-m", "gateway.cli")


def run(coro, timeout: float = 180):  # a hang bound (a cold Numba cache compiles first)
    return asyncio.run(asyncio.wait_for(coro, timeout))


def hexid(device_id: int) -> str:
    return f"{device_id:016x}"


def admin_calls(device: str) -> list[tuple[str, object]]:
    """Every AdminService RPC, each with a request that would change (or read) the registry if allowed:
    a caller escalating itself, revoking the operator, rebinding, listing."""
    return [
        ("Register", admin_pb2.RegisterRequest(kind="consumer", name="intruder", issue_token=True)),
        ("Revoke", admin_pb2.RevokeRequest(kind="consumer", name="operator")),
        ("Bind", admin_pb2.BindRequest(relay="phone-1", device="00000000000000aa")),
        ("Unbind", admin_pb2.BindRequest(relay="phone-1", device=device)),
        ("Grant", admin_pb2.GrantRequest(consumer="viewer", family="*", operation="admin")),
        ("Ungrant", admin_pb2.GrantRequest(consumer="local", family="steps", operation="subscribe")),
        ("List", admin_pb2.ListRequest()),
    ]


async def attempt(channel: grpc.aio.Channel, method: str, request) -> tuple[grpc.StatusCode, str]:
    try:
        await getattr(admin_pb2_grpc.AdminServiceStub(channel), method)(request)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def registry_view(url: str):
    """The registry as stored, without what every authenticated call moves (last seen)."""
    with open_store(url) as store:
        snap = store.registry_snapshot()
    principals = tuple(dataclasses.replace(p, last_seen_us=None) for p in snap.principals)
    return dataclasses.replace(snap, principals=principals)


async def register_consumer(creds: Credentials, name: str) -> ClientIdentity:
    key = new_key()
    async with creds.channel("operator") as op:
        reply = await admin_pb2_grpc.AdminServiceStub(op).Register(
            admin_pb2.RegisterRequest(
                kind="consumer", name=name, csr_pem=make_csr(key, Identity("consumer", name))
            )
        )
    return ClientIdentity(reply.certificate_pem, key_pem(key), reply.ca_pem)


def token_channel(address: str, ca_pem: bytes, token: str) -> grpc.aio.Channel:
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(ca_pem), grpc.access_token_call_credentials(token)
    )
    return grpc.aio.secure_channel(address, creds)


def test_admin_rpcs_refused_without_admin_and_admin_alone_reads_no_data(tmp_path):
    cfg = tls_config(tmp_path)
    d, batches = band(seed=51, minutes=20, batch_minutes=5)
    device = hexid(d)

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(cfg.state_dir, gw.address)
            async with creds.channel("operator") as op:
                admin = admin_pb2_grpc.AdminServiceStub(op)
                viewer = await admin.Register(
                    admin_pb2.RegisterRequest(kind="consumer", name="viewer", issue_token=True)
                )
                await admin.Grant(
                    admin_pb2.GrantRequest(consumer="viewer", family="steps", operation="subscribe")
                )
                await admin.Register(admin_pb2.RegisterRequest(kind="relay", name="phone-1"))
                await admin.Bind(admin_pb2.BindRequest(relay="phone-1", device=device))
            async with await creds.band_channel(d) as ch:  # data exists that admin alone must not reach
                up = Uploader(ch, d)
                assert (await up.send(batches[0])).code == OK
                await up.close()

            callers = {
                # token first: refusals count against the peer address, which token lookups are throttled by
                "consumer token": token_channel(gw.token_address, viewer.ca_pem, viewer.token),
                "local consumer certificate": creds.channel("consumer"),
                "band certificate": await creds.band_channel(d),
            }
            whoami = {}
            for name, ch in callers.items():  # each caller's credential is on record before the baseline
                whoami[name] = await admin_pb2_grpc.IdentityServiceStub(ch).WhoAmI(admin_pb2.WhoAmIRequest())
            before, version = registry_view(cfg.store), gw.registry.policy.version
            results = {}
            for name, ch in callers.items():
                for method, request in admin_calls(device):
                    results[name, method] = await attempt(ch, method, request)
                await ch.close()
            after, version_after = registry_view(cfg.store), gw.registry.policy.version

            # the operator grants the admin operation to a consumer: admin it is, data it has none
            auditor = await register_consumer(creds, "auditor")
            async with creds.channel("operator") as op:
                await admin_pb2_grpc.AdminServiceStub(op).Grant(
                    admin_pb2.GrantRequest(consumer="auditor", family="*", operation="admin")
                )
            async with grpc.aio.secure_channel(gw.address, auditor.credentials()) as ch:
                listed = await admin_pb2_grpc.AdminServiceStub(ch).List(admin_pb2.ListRequest(kind="relay"))
                registered = await admin_pb2_grpc.AdminServiceStub(ch).Register(
                    admin_pb2.RegisterRequest(kind="relay", name="phone-5")
                )
                features = features_pb2_grpc.FeatureServiceStub(ch)
                data = []
                for call in (
                    features.Subscribe(features_pb2.SubscribeRequest(no_follow=True)),
                    features.Subscribe(features_pb2.SubscribeRequest(families=["steps"], no_follow=True)),
                    features.Export(features_pb2.ExportRequest(device=device)),
                ):
                    got = []
                    try:
                        async for record in call:
                            got.append(record)
                    except grpc.aio.AioRpcError as e:
                        data.append((e.code(), e.details(), got))
                    else:
                        data.append((grpc.StatusCode.OK, "", got))
            return whoami, results, before, after, version, version_after, listed, registered, data

    whoami, results, before, after, version, version_after, listed, registered, data = run(scenario())
    assert {n: (w.kind, w.name) for n, w in whoami.items()} == {
        "consumer token": ("consumer", "viewer"),
        "local consumer certificate": ("consumer", "local"),
        "band certificate": ("device", device),
    }
    assert len(results) == 3 * 7
    for (caller, method), (code, details) in results.items():
        assert code == grpc.StatusCode.PERMISSION_DENIED, (caller, method, code, details)
        assert "holds no admin grant" in details, (caller, method, details)
    assert after == before and version_after == version, "a refused admin call changed the registry"
    assert ("consumer", "intruder") not in {(p.kind, p.name) for p in after.principals}

    assert [(p.name, list(p.bound)) for p in listed.principals] == [("phone-1", [device])]
    assert registered.principal.state == "active"
    assert stored(cfg.store), "there are records the admin-only consumer could have read"
    (sub_all, sub_steps, export) = data
    assert sub_all[0] == grpc.StatusCode.PERMISSION_DENIED and sub_all[2] == []
    assert "holds no subscribe grant" in sub_all[1]
    assert sub_steps[0] == grpc.StatusCode.PERMISSION_DENIED and sub_steps[2] == []
    assert "holds no subscribe grant for steps" in sub_steps[1]
    assert export[0] == grpc.StatusCode.PERMISSION_DENIED and export[2] == []
    assert "holds no export grant" in export[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'protos'}"}
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, no traceback, nothing on stdout, the error on one line of stderr naming `words`."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    error = result.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in error, (word, result.stderr)


def test_admin_cli_end_to_end_and_the_audit_log_it_leaves(tmp_path):
    db = tmp_path / "gw.db"
    server = ServeProcess(tmp_path, db)
    device, _ = band(seed=52, minutes=20, batch_minutes=5)
    dev = hexid(device)
    client = ("--state-dir", str(server.state_dir), "--target", server.address)
    try:
        reg = cli("admin", "register", "relay", "phone-9", "--issue-token", *client, cwd=tmp_path)
        assert reg.returncode == 0, reg.stderr
        registered = json.loads(reg.stdout)
        token = registered["token"]
        assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", token)
        assert registered["credential_id"] == "token:" + hashlib.sha256(token.encode()).hexdigest()
        assert registered["principal"]["kind"] == "relay" and registered["principal"]["state"] == "active"

        # the printed token is a working credential on the TLS-only listener
        token_address = server._field("token_address")
        ca_pem = (server.state_dir / "ca.pem").read_bytes()

        async def whoami() -> tuple[grpc.StatusCode, object]:
            async with token_channel(token_address, ca_pem, token) as ch:
                try:
                    me = await admin_pb2_grpc.IdentityServiceStub(ch).WhoAmI(admin_pb2.WhoAmIRequest())
                except grpc.aio.AioRpcError as e:
                    return e.code(), e.details()
                return grpc.StatusCode.OK, (me.kind, me.name)

        assert run(whoami()) == (grpc.StatusCode.OK, ("relay", "phone-9"))

        bind = cli("admin", "bind", "phone-9", dev, *client, cwd=tmp_path)
        assert bind.returncode == 0, bind.stderr
        assert json.loads(bind.stdout)["bound"] == [dev]

        consumer = cli("admin", "register", "consumer", "clinic", *client, cwd=tmp_path)
        assert consumer.returncode == 0, consumer.stderr
        grant = cli("admin", "grant", "clinic", "steps", "subscribe", "--device", dev, *client, cwd=tmp_path)
        assert grant.returncode == 0, grant.stderr
        assert json.loads(grant.stdout)["grants"] == [
            {"family": "steps", "operation": "subscribe", "devices": [dev]}
        ]

        listed = cli("admin", "list", "--kind", "relay", *client, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        relays = [json.loads(line) for line in listed.stdout.splitlines()]
        assert {r["kind"] for r in relays} == {"relay"}
        (phone,) = [r for r in relays if r["name"] == "phone-9"]
        assert phone["bound"] == [dev] and phone["state"] == "active"
        assert token not in listed.stdout  # shown once, at registration

        revoke = cli("admin", "revoke", "relay", "phone-9", *client, cwd=tmp_path)
        assert revoke.returncode == 0, revoke.stderr
        assert json.loads(revoke.stdout)["state"] == "revoked"
        code, details = run(whoami())
        assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details

        # errors: one line on stderr, exit 2, no traceback
        assert_one_line_error(
            cli("admin", "bind", "ghost", dev, *client, cwd=tmp_path), "admin bind", "NOT_FOUND", "ghost"
        )
        assert_one_line_error(cli("tail", "--from", "-5", *client, cwd=tmp_path), "--from", "-5")
    finally:
        assert server.terminate() == 0

    state = ("--store", f"sqlite:///{db}", "--state-dir", str(server.state_dir))
    verified = cli("audit", "verify", *state, cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "verified" in verified.stdout
    shown = cli("audit", "show", "--store", f"sqlite:///{db}", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    entries = [json.loads(line) for line in shown.stdout.splitlines()]
    by_action = {}
    for e in entries:
        by_action.setdefault(e["action"], []).append(e)
    operator = "consumer:operator"
    assert any(
        e["subject"] == "relay:phone-9" and e["details"] == {"type": "token"} and e["actor"] == operator
        for e in by_action.get("credential.issued", [])
    )
    assert [(e["subject"], e["details"]) for e in by_action.get("binding.added", [])] == [
        ("relay:phone-9", {"device": audit_name(server.state_dir, dev)})  # the band, by its pseudonym
    ]
    assert dev not in shown.stdout
    assert any(
        e["subject"] == "consumer:clinic" and e["details"]["family"] == "steps" and e["actor"] == operator
        for e in by_action.get("grant.added", [])
    )
    assert [e["subject"] for e in by_action.get("principal.revoked", [])] == ["relay:phone-9"]
    assert token not in shown.stdout and token not in verified.stdout
    for path in tmp_path.rglob("*"):  # the store, its WAL, the state dir, the server's log
        if path.is_file():
            assert token.encode() not in path.read_bytes(), f"the token is in {path}"
