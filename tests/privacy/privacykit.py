"""What the privacy tests share: a gateway with `bandgate serve`'s privacy defaults over real TLS, bands
enrolled through the admin API, and the PrivacyService called as the band (its own certificate) or as the
operator (the local admin credential)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import orjson

from bandgate.v1 import batch_pb2, ingest_pb2_grpc, privacy_pb2, privacy_pb2_grpc
from gateway.config import GatewayConfig
from gateway.server import Gateway, run_server
from gateway.store import open_store
from tests.gateway.gatewaykit import Credentials, Uploader, band, privacy_config, stored

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED


def run(coro, timeout: float = 180):  # a hang bound (a cold Numba cache compiles first)
    return asyncio.run(asyncio.wait_for(coro, timeout))


def hexid(device_id: int) -> str:
    return f"{device_id:016x}"


@dataclass
class Call:
    """An RPC's outcome: its reply, or its status and details."""

    code: grpc.StatusCode
    details: str = ""
    reply: object = None


async def call(method, request, **kwargs) -> Call:
    try:
        return Call(OK, "", await method(request, **kwargs))
    except grpc.aio.AioRpcError as e:
        return Call(e.code(), e.details() or "")


class Owner:
    """A band's owner: the PrivacyService over the band's own mutual-TLS channel."""

    def __init__(self, channel: grpc.aio.Channel, device_id: int):
        self.stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
        self.device = hexid(device_id)

    async def profile(self, totp: str = "", **fields) -> Call:
        return await call(
            self.stub.SetProfile,
            privacy_pb2.SetProfileRequest(device=self.device, profile=privacy_pb2.Profile(**fields)),
        )

    async def consent(self, grant: Iterable[str] = (), withdraw: Iterable[str] = (), totp: str = "") -> Call:
        return await call(
            self.stub.SetConsent,
            privacy_pb2.SetConsentRequest(
                device=self.device, grant=list(grant), withdraw=list(withdraw), totp=totp
            ),
        )

    async def export(self, totp: str = "", fmt: str = "jsonl") -> Call:
        try:
            data = b"".join(
                [
                    c.data
                    async for c in self.stub.Export(
                        privacy_pb2.PrivacyExportRequest(device=self.device, totp=totp, format=fmt)
                    )
                ]
            )
        except grpc.aio.AioRpcError as e:
            return Call(e.code(), e.details() or "")
        return Call(OK, "", data)

    async def erase(self, totp: str = "") -> Call:
        return await call(self.stub.Erase, privacy_pb2.DeviceRequest(device=self.device, totp=totp))


def lines(data: bytes) -> list[dict]:
    return [orjson.loads(line) for line in data.splitlines() if line]


@contextlib.asynccontextmanager
async def privacy_gateway(
    tmp_path: Path, **changes
) -> AsyncIterator[tuple[Gateway, Credentials, GatewayConfig]]:
    cfg = privacy_config(tmp_path, **changes)
    async with run_server(cfg) as gw:
        yield gw, Credentials(cfg.state_dir, gw.address), cfg


async def refused_stream(
    channel: grpc.aio.Channel, device_id: int, batch: batch_pb2.Batch
) -> tuple[grpc.StatusCode, str, list]:
    """A new Upload stream with one batch: its status, details, and the acks that came (none if refused
    at open)."""
    call_ = ingest_pb2_grpc.IngestServiceStub(channel).Upload()
    acks = []
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call_.write(batch)
        await call_.done_writing()
        while (ack := await call_.read()) is not grpc.aio.EOF:
            acks.append(ack)
    return await call_.code(), await call_.details(), acks


async def send_all(up: Uploader, batches: Iterable[batch_pb2.Batch]) -> list:
    return [await up.send(b) for b in batches]


def families_after(url: str, device_id: int, start_us: int) -> set[str]:
    """The families stored for the device with records starting at or after `start_us`."""
    return {r["family"] for r in stored(url, device=hexid(device_id)) if r["start_us"] >= start_us}


def high_water(url: str, device_id: int) -> int | None:
    with open_store(url) as store:
        row = store.device(device_id)
    return None if row is None else row.last_seq


__all__ = ["Owner", "band", "lines", "privacy_gateway", "run"]
