"""Consumer grants (issue 12, item 7) as a grid, HBase TestCellACLs style: a real TLS gateway holds records
of every feature family from two bands, and every consumer × family × operation cell is asserted — granted
cells return exactly the store's records of that family, refused cells are PERMISSION_DENIED naming the
family. Then device-narrowed grants, and grants given and taken while a subscription is open."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from bandgate.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    batch_pb2,
    features_pb2,
    features_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
)
from gateway.envelope import build_batch
from gateway.pipeline import OK as ACK_OK
from gateway.security.client import ClientIdentity, local_ca
from gateway.security.pki import Identity, key_pem, make_csr, new_key
from gateway.server import Gateway, run_server
from gateway.simulator.recorder import recording_frames
from gateway.simulator.signals import DEFAULT_START_US, simulate_band
from gateway.store import open_store
from gateway.store.base import ADMIN_FAMILY, FAMILIES
from tests.gateway.gatewaykit import Credentials, Uploader, band, gateway_store, tls_config

FAMILY_LIST = sorted(FAMILIES)
A = 0x00000000000A0A0A
B = 0x00000000000B0B0B
DENIED = grpc.StatusCode.PERMISSION_DENIED
OK = grpc.StatusCode.OK


def run(coro, timeout: float = 180):  # a hang bound (a cold Numba cache compiles first)
    return asyncio.run(asyncio.wait_for(coro, timeout))


@functools.cache
def night_band(seed: int, device_id: int) -> tuple[batch_pb2.Batch, ...]:
    """An afternoon and evening awake, then an hour in bed from 22:30 local, one minute of it lost: records
    of every family (25 Hz, to keep it cheap).

    The sleep-period detector opens a period only on a band that has seen its wearer's heart rate awake
    (decoder/periods.py), hence the 2.5 h before bed. The night summary and the day's resting heart rate
    are emitted when a stream ends, which on a live gateway is a gap in the samples (here: the frame 10
    minutes before the end never arrives, the sequence numbers stay consecutive, as a band that lost a
    minute of samples numbers its frames)."""
    awake, minutes = 150, 210
    bed_us = DEFAULT_START_US - 10 * 3600 * 1_000_000 - 30 * 60 * 1_000_000  # 21:30 UTC, 22:30 local
    rec = simulate_band(
        seed,
        minutes,
        device_id=device_id,
        start_us=bed_us - awake * 60_000_000,
        scenario="schedule",
        schedule=(("day", 0, awake), ("sleep", awake, minutes)),
        sample_rate_hz=25,
    )
    frames = recording_frames(rec)
    lost = minutes - 10
    frames = frames[:lost] + [dataclasses.replace(f, seq=f.seq - 1) for f in frames[lost + 1 :]]
    return tuple(build_batch(frames[i : i + 10]) for i in range(0, len(frames), 10))


# --- clients -------------------------------------------------------------------------------------------


async def register_consumer(op: grpc.aio.Channel, name: str) -> ClientIdentity:
    """A consumer (a backend) registered by the operator, with a certificate for a key made here."""
    key = new_key()
    reply = await admin_pb2_grpc.AdminServiceStub(op).Register(
        admin_pb2.RegisterRequest(
            kind="consumer", name=name, csr_pem=make_csr(key, Identity("consumer", name))
        )
    )
    return ClientIdentity(reply.certificate_pem, key_pem(key), reply.ca_pem)


async def register_token_consumer(op: grpc.aio.Channel, name: str) -> str:
    reply = await admin_pb2_grpc.AdminServiceStub(op).Register(
        admin_pb2.RegisterRequest(kind="consumer", name=name, issue_token=True)
    )
    assert reply.token
    return reply.token


async def grant(op: grpc.aio.Channel, consumer: str, family: str, operation: str, devices=()) -> None:
    await admin_pb2_grpc.AdminServiceStub(op).Grant(
        admin_pb2.GrantRequest(
            consumer=consumer, family=family, operation=operation, devices=[f"{d:016x}" for d in devices]
        )
    )


async def ungrant(op: grpc.aio.Channel, consumer: str, family: str, operation: str) -> None:
    await admin_pb2_grpc.AdminServiceStub(op).Ungrant(
        admin_pb2.GrantRequest(consumer=consumer, family=family, operation=operation)
    )


Row = tuple[int, str, str, int]  # cursor, family, device, start_us


def row_of(record: features_pb2.FeatureRecord) -> Row:
    return (record.cursor, record.family, record.device, record.start_us)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a call returned: its records (as rows), its status and the status details."""

    rows: tuple[Row, ...]
    code: grpc.StatusCode
    details: str

    def __str__(self) -> str:
        families = sorted({r[1] for r in self.rows})
        return f"{self.code.name} {self.details!r} ({len(self.rows)} records of {families})"


async def outcome(call) -> Outcome:
    rows: list[Row] = []
    try:
        async for record in call:
            rows.append(row_of(record))
    except grpc.aio.AioRpcError as e:
        return Outcome(tuple(rows), e.code(), e.details() or "")
    return Outcome(tuple(rows), OK, "")


async def subscribe(ch: grpc.aio.Channel, families=(), device: int | None = None) -> Outcome:
    request = features_pb2.SubscribeRequest(
        families=list(families), device=f"{device:016x}" if device is not None else "", no_follow=True
    )
    return await outcome(features_pb2_grpc.FeatureServiceStub(ch).Subscribe(request))


async def export(ch: grpc.aio.Channel, device: int, families=()) -> Outcome:
    request = features_pb2.ExportRequest(device=f"{device:016x}", families=list(families))
    return await outcome(features_pb2_grpc.FeatureServiceStub(ch).Export(request))


async def admin_list(ch: grpc.aio.Channel) -> Outcome:
    try:
        reply = await admin_pb2_grpc.AdminServiceStub(ch).List(admin_pb2.ListRequest())
    except grpc.aio.AioRpcError as e:
        return Outcome((), e.code(), e.details() or "")
    return Outcome((), OK, " ".join(f"{p.kind}:{p.name}" for p in reply.principals))


def store_rows(url: str, families, device: int | None = None) -> tuple[Row, ...]:
    """What the store holds of `families` (of one device, or all), in cursor order."""
    with gateway_store(url) as store:
        found = store.read_since(
            0, families=set(families), device=None if device is None else f"{device:016x}", limit=10**9
        )
    return tuple((c, r["family"], r["device"], r["start_us"]) for c, r in found)


# --- a gateway holding every family --------------------------------------------------------------------


async def upload(creds: Credentials, device: int, batches) -> None:
    async with await creds.band_channel(device) as ch:
        # a height in the owner's profile, so that `distance` records are made too
        await privacy_pb2_grpc.PrivacyServiceStub(ch).SetProfile(
            privacy_pb2.SetProfileRequest(profile=privacy_pb2.Profile(height_cm=172.0))
        )
        up = Uploader(ch, device)
        for batch in batches:
            ack = await up.send(batch)
            assert ack.code == ACK_OK, ack.reason
        assert await up.close() == OK


@contextlib.asynccontextmanager
async def loaded_gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Credentials]]:
    """A TLS gateway whose store holds records of every family from bands A and B."""
    cfg = tls_config(tmp_path)
    async with run_server(cfg) as gw:
        creds = Credentials(cfg.state_dir, gw.address)
        await upload(creds, A, night_band(3, A))
        await upload(creds, B, night_band(4, B))
        for device in (A, B):
            held = {r[1] for r in store_rows(cfg.store, FAMILIES, device)}
            assert held == FAMILIES, f"device {device:016x} has no records of {sorted(FAMILIES - held)}"
        yield gw, creds


# --- the grid ------------------------------------------------------------------------------------------


def test_every_consumer_family_operation_cell(tmp_path):
    """Consumers holding subscribe on one family each, export on some, nothing at all, admin only, and a
    token consumer: for each of them and each family, Subscribe and Export naming that family; for each of
    them, Subscribe and Export naming none, and the admin List. Every cell is checked against what its
    grants say: the exact records of the store, or PERMISSION_DENIED with the reason."""
    # The token consumer goes first: refusals are throttled per peer address too, and a token caller is
    # checked against its address's throttle, which every other consumer's refusals (all on loopback) fill.
    holdings: dict[str, set[tuple[str, str]]] = {
        "token-mixed": {("sleep", "subscribe"), ("night", "export"), ("heart", "export")}
    }
    holdings |= {f"sub-{f}": {(f, "subscribe")} for f in FAMILY_LIST}
    holdings["exporter"] = {(f, "export") for f in FAMILY_LIST[::2]}
    holdings["nobody"] = set()
    holdings["admin-only"] = {(ADMIN_FAMILY, "admin")}
    url = tls_config(tmp_path).store

    async def scenario() -> tuple[list[str], int]:
        wrong: list[str] = []
        cells = 0
        async with loaded_gateway(tmp_path) as (gw, creds), creds.channel("operator") as op:
            channels: dict[str, grpc.aio.Channel] = {}
            for name, held in holdings.items():
                if name.startswith("token-"):
                    token = await register_token_consumer(op, name)
                    ca = local_ca(creds.state_dir)
                    channel_creds = grpc.composite_channel_credentials(
                        grpc.ssl_channel_credentials(ca), grpc.access_token_call_credentials(token)
                    )
                    channels[name] = grpc.aio.secure_channel(gw.token_address, channel_creds)
                else:
                    identity = await register_consumer(op, name)
                    channels[name] = grpc.aio.secure_channel(gw.address, identity.credentials())
                for family, operation in sorted(held):
                    await grant(op, name, family, operation)

            def check(cell: str, got: Outcome, rows: tuple[Row, ...] | None, refusal: str) -> None:
                """`rows` granted: exactly those records, and some; None: refused with `refusal`."""
                nonlocal cells
                cells += 1
                if rows is not None:
                    if got.code != OK or got.rows != rows or not rows:
                        wrong.append(f"{cell}: expected {len(rows)} records, got {got}")
                elif got.code != DENIED or got.details != refusal or got.rows:
                    wrong.append(f"{cell}: expected PERMISSION_DENIED {refusal!r}, got {got}")

            for name, held in holdings.items():
                ch = channels[name]
                who = f"consumer:{name}"
                for family in FAMILY_LIST:
                    for operation in ("subscribe", "export"):
                        if operation == "subscribe":
                            got, rows = await subscribe(ch, [family]), store_rows(url, {family})
                        else:
                            got, rows = await export(ch, A, [family]), store_rows(url, {family}, A)
                        granted = (family, operation) in held
                        check(
                            f"{name} × {family} × {operation}",
                            got,
                            rows if granted else None,
                            f"{who} holds no {operation} grant for {family}",
                        )
                # no families named: every family granted to the caller, or refused if none
                for operation in ("subscribe", "export"):
                    mine = {f for f, op_ in held if op_ == operation}
                    if operation == "subscribe":
                        got, rows = await subscribe(ch), store_rows(url, mine)
                    else:
                        got, rows = await export(ch, A), store_rows(url, mine, A)
                    check(
                        f"{name} × (all granted) × {operation}",
                        got,
                        rows if mine else None,
                        f"{who} holds no {operation} grant",
                    )
                got = await admin_list(ch)
                cells += 1
                if (ADMIN_FAMILY, "admin") in held:
                    if got.code != OK or who not in got.details.split():
                        wrong.append(f"{name} × admin: expected the registry, got {got}")
                elif got.code != DENIED or got.details != f"{who} holds no admin grant":
                    wrong.append(f"{name} × admin: expected PERMISSION_DENIED, got {got}")
            for ch in channels.values():
                await ch.close()
            throttled = gw.metrics.registry.get_sample_value("bandgate_auth_throttled_total")
        return wrong, cells, throttled

    wrong, cells, throttled = run(scenario())
    assert cells == len(holdings) * (2 * len(FAMILY_LIST) + 3)
    assert not wrong, "cells that do not match their grants:\n" + "\n".join(wrong)
    assert throttled == 0  # a throttled cell would have tested the throttle, not the grant


def test_unknown_family_is_invalid_argument_even_for_a_caller_holding_everything(tmp_path):
    """The operator holds every family: a family the gateway does not know is still not a family."""

    async def scenario():
        async with loaded_gateway(tmp_path) as (_gw, creds), creds.channel("operator") as op:
            return (
                await subscribe(op, ["spo2"]),
                await subscribe(op, ["steps", "spo2"]),
                await export(op, A, ["spo2"]),
                await subscribe(op, ["steps"]),
            )

    *unknown, known = run(scenario())
    for got in unknown:
        assert got.code == grpc.StatusCode.INVALID_ARGUMENT and not got.rows, str(got)
        assert "unknown families ['spo2']" in got.details
    assert known.code == OK and known.rows == store_rows(tls_config(tmp_path).store, {"steps"})


def test_device_narrowed_grant_shows_only_its_devices(tmp_path):
    """Subscribe and export on steps narrowed to band A: A's steps records and nothing of B, whether the
    request names the family or not; subscribing to or exporting B by name is refused."""
    url = tls_config(tmp_path).store

    async def scenario():
        async with loaded_gateway(tmp_path) as (gw, creds), creds.channel("operator") as op:
            identity = await register_consumer(op, "narrow")
            await grant(op, "narrow", "steps", "subscribe", devices=[A])
            await grant(op, "narrow", "steps", "export", devices=[A])
            async with grpc.aio.secure_channel(gw.address, identity.credentials()) as ch:
                return {
                    "named": await subscribe(ch, ["steps"]),
                    "all granted": await subscribe(ch),
                    "device A": await subscribe(ch, ["steps"], device=A),
                    "device B": await subscribe(ch, ["steps"], device=B),
                    "device B all": await subscribe(ch, device=B),
                    "heart": await subscribe(ch, ["heart"]),
                    "export A": await export(ch, A, ["steps"]),
                    "export A all": await export(ch, A),
                    "export B": await export(ch, B, ["steps"]),
                    "export B all": await export(ch, B),
                }

    got = run(scenario())
    a_steps = store_rows(url, {"steps"}, A)
    assert a_steps and store_rows(url, {"steps"}, B)  # B has steps records the grant must hide
    for name in ("named", "all granted", "device A", "export A", "export A all"):
        assert got[name].code == OK and got[name].rows == a_steps, f"{name}: {got[name]}"
    # naming a device the grant does not reach is refused, as naming an ungranted family is
    for name in ("device B", "device B all"):
        assert got[name].code == DENIED and not got[name].rows, f"B's records leaked: {got[name]}"
    assert got["device B"].details == "consumer:narrow holds no subscribe grant for steps for this device"
    assert got["device B all"].details == "consumer:narrow holds no subscribe grant for this device"
    assert got["heart"].code == DENIED
    assert got["heart"].details == "consumer:narrow holds no subscribe grant for heart"
    for name in ("export B", "export B all"):
        assert got[name].code == DENIED and not got[name].rows, f"{name}: {got[name]}"
        assert "consumer:narrow holds no export grant" in got[name].details


# --- grants changing under an open subscription --------------------------------------------------------


class Follower:
    """An open (following) subscription read into a list in the background, so a test can wait for a
    cursor without cancelling a read."""

    def __init__(self, ch: grpc.aio.Channel, families=()):
        self.call = features_pb2_grpc.FeatureServiceStub(ch).Subscribe(
            features_pb2.SubscribeRequest(families=list(families))
        )
        self.rows: list[Row] = []
        self.marks: list[int] = []  # len(rows) when each phase began
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> Outcome:
        try:
            async for record in self.call:
                self.rows.append(row_of(record))
        except grpc.aio.AioRpcError as e:
            return Outcome(tuple(self.rows), e.code(), e.details() or "")
        return Outcome(tuple(self.rows), OK, "")

    @property
    def cursor(self) -> int:
        return self.rows[-1][0] if self.rows else 0

    async def reach(self, cursor: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.cursor < cursor:
            assert not self.task.done(), f"the subscription ended: {self.task.result()}"
            assert time.monotonic() < deadline, f"stuck at cursor {self.cursor}, waiting for {cursor}"
            await asyncio.sleep(0.01)

    async def ended(self, timeout: float = 10.0) -> Outcome:
        done, _ = await asyncio.wait({self.task}, timeout=timeout)
        assert done, f"the subscription is still open {timeout} s later"
        return self.task.result()


def test_grant_and_ungrant_apply_to_open_subscriptions(tmp_path):
    """A consumer holding steps subscribes naming no family: a heart grant adds heart records to the same
    stream, taking steps away stops steps records (none stored after the change arrives on it), and taking
    the last grant ends it PERMISSION_DENIED. A stream that named heart ends PERMISSION_DENIED naming heart
    when heart is taken, while one naming steps goes on."""
    cfg = tls_config(tmp_path)
    device, batches = band(seed=21, minutes=40, batch_minutes=5)
    assert len(batches) >= 4

    async def scenario():
        async with run_server(cfg) as gw, creds_channel(cfg, gw) as (creds, op):
            consumer = await register_consumer(op, "live")
            other = await register_consumer(op, "named")
            await grant(op, "live", "steps", "subscribe")
            for family in ("steps", "heart"):
                await grant(op, "named", family, "subscribe")
            async with (
                grpc.aio.secure_channel(gw.address, consumer.credentials()) as ch,
                grpc.aio.secure_channel(gw.address, other.credentials()) as other_ch,
                await creds.band_channel(device) as band_ch,
            ):
                up = Uploader(band_ch, device)
                follow = Follower(ch)
                named_heart = Follower(other_ch, ["heart"])
                named_steps = Follower(other_ch, ["steps"])
                bounds = []  # store cursor before each phase's upload, and after

                async def phase(batch, families) -> None:
                    bounds.append(latest(cfg.store))
                    assert (await up.send(batch)).code == ACK_OK
                    await follow.reach(max(r[0] for r in store_rows(cfg.store, families)))

                await phase(batches[0], {"steps"})  # steps only
                follow.marks.append(len(follow.rows))
                await grant(op, "live", "heart", "subscribe")
                await phase(batches[1], {"steps", "heart"})
                follow.marks.append(len(follow.rows))
                await ungrant(op, "live", "steps", "subscribe")
                await phase(batches[2], {"heart"})
                follow.marks.append(len(follow.rows))
                await named_steps.reach(max(r[0] for r in store_rows(cfg.store, {"steps"})))
                await ungrant(op, "named", "heart", "subscribe")
                named_heart_end = await named_heart.ended()
                await ungrant(op, "live", "heart", "subscribe")
                live_end = await follow.ended()
                bounds.append(latest(cfg.store))
                assert (await up.send(batches[3])).code == ACK_OK  # after every change: steps for "named"
                await named_steps.reach(max(r[0] for r in store_rows(cfg.store, {"steps"})))
                named_steps_alive = not named_steps.task.done()
                named_steps.call.cancel()
                return follow, live_end, named_heart_end, named_steps_alive, bounds

    follow, live_end, named_heart_end, named_steps_alive, bounds = run(scenario())
    first, second, third = (
        follow.rows[: follow.marks[0]],
        follow.rows[follow.marks[0] : follow.marks[1]],
        follow.rows[follow.marks[1] : follow.marks[2]],
    )
    url = cfg.store
    # steps only, everything the store holds of it
    assert first == [r for r in store_rows(url, {"steps"}) if r[0] <= bounds[1]] and first
    assert {r[1] for r in first} == {"steps"}
    # after the heart grant: from the stream's cursor on, steps and heart, in commit order, nothing else
    resumed = first[-1][0]
    expected = [r for r in store_rows(url, {"steps", "heart"}) if resumed < r[0] <= bounds[2]]
    assert second == expected
    assert any(r[1] == "heart" and r[0] > bounds[1] for r in second), "no heart record of the new batch"
    # after steps was taken: heart only; the batch stored after the change holds steps the stream never got
    resumed = second[-1][0]
    assert third == [r for r in store_rows(url, {"heart"}) if resumed < r[0] <= bounds[3]]
    assert any(r[1] == "steps" and r[0] > bounds[2] for r in store_rows(url, {"steps"}))
    assert len(follow.rows) == follow.marks[2]  # nothing after the last grant went
    assert live_end.code == DENIED and live_end.details == "consumer:live holds no subscribe grant"
    assert named_heart_end.code == DENIED
    assert named_heart_end.details == "consumer:named holds no subscribe grant for heart"
    assert named_steps_alive  # the same consumer's other stream, naming a family it still holds, goes on


@contextlib.asynccontextmanager
async def creds_channel(cfg, gw: Gateway) -> AsyncIterator[tuple[Credentials, grpc.aio.Channel]]:
    creds = Credentials(cfg.state_dir, gw.address)
    async with creds.channel("operator") as op:
        yield creds, op


def latest(url: str) -> int:
    with open_store(url) as store:
        return store.latest_cursor()
