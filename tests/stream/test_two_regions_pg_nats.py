"""Two regions as they are deployed (issue 14, item 6): each region's gateway on its own PostgreSQL
schema (and key schema) and its own NATS JetStream, one fleet CA, real mutual TLS, compute in worker
processes. A band of eu streams through eu: its features are in eu's database and on eu's stream. The
same band reaching us is sent home (FAILED_PRECONDITION, home address in the trailer) before anything it
sent is looked at: us's database holds no row naming it in any table, and us's stream no message.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from psycopg import sql

from gateway.pipeline import OK
from gateway.regions import HOME_ADDRESS_TRAILER, HOME_REGION_TRAILER
from gateway.security import setup as security_setup
from gateway.server import run_server
from tests.gateway.gatewaykit import Credentials, Uploader, band, key, processed, tls_config
from tests.services import postgres_url, unique_name
from tests.stream.natskit import all_messages, delete_streams, record_of, shared_nats, unique_prefix
from tests.stream.test_two_gateways_pg_nats import drained, read_store

REGIONS = ("eu", "us")


@pytest.fixture
def region_services() -> Iterator[dict[str, dict[str, str]]]:
    """Per region: a PostgreSQL schema and key schema of the test database, and a NATS stream prefix;
    all dropped after."""
    base, nats_base = postgres_url(), shared_nats()
    out = {}
    for region in REGIONS:
        schema = unique_name(f"test_{region}")
        out[region] = dict(
            store=f"{base}?schema={schema}",
            schema=schema,
            key_schema=f"{schema}_keys",
            stream=f"{nats_base}?prefix={unique_prefix()}",
        )
    yield out
    with psycopg.connect(base, autocommit=True) as conn:
        for s in out.values():
            for name in (s["schema"], s["key_schema"]):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    for s in out.values():
        asyncio.run(delete_streams(nats_base, s["stream"].partition("?prefix=")[2]))


def rows_naming(schemas: tuple[str, ...], device: str) -> dict[str, int]:
    """Every table of `schemas` with a device or name column that holds `device`, with its row count."""
    found = {}
    with psycopg.connect(postgres_url(), autocommit=True) as conn:
        columns = conn.execute(
            "SELECT table_schema, table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = ANY(%s) AND column_name IN ('device', 'name', 'purge_device')",
            (list(schemas),),
        ).fetchall()
        for schema, table, column in columns:
            query = sql.SQL("SELECT count(*) FROM {}.{} WHERE {} = %s").format(
                sql.Identifier(schema), sql.Identifier(table), sql.Identifier(column)
            )
            (n,) = conn.execute(query, (device,)).fetchone()
            if n:
                found[f"{schema}.{table}.{column}"] = n
    return found


def stream_of(url: str) -> list[tuple[str, str, dict]]:
    base, _, prefix = url.partition("?prefix=")
    return asyncio.run(all_messages(base, prefix))


def test_a_bands_data_stays_in_its_home_regions_database_and_stream(
    tmp_path: Path, region_services: dict[str, dict[str, str]]
) -> None:
    dirs = {r: tmp_path / r for r in REGIONS}
    for d in dirs.values():
        d.mkdir()

    def config(region: str, regions: str = ""):
        s = region_services[region]
        return tls_config(
            dirs[region],
            region=region,
            regions=regions,
            store=s["store"],
            key_schema=s["key_schema"],
            stream=s["stream"],
            compute_processes=1,
            auto_register=region == "us",  # even so, a band of eu is not registered in us
        )

    security_setup.prepare(config("eu", "eu=eu.example:1,us=us.example:2"))  # the fleet CA both share
    shutil.copytree(dirs["eu"] / "state", dirs["us"] / "state")
    device, batches = band(seed=61, minutes=20, batch_minutes=5)
    name = f"{device:016x}"

    async def scenario():
        async with run_server(config("eu", "eu=eu.example:1,us=us.example:2")) as eu:
            regions = f"eu={eu.address},us=us.example:2"
            async with run_server(config("us", regions)) as us:
                identity = await Credentials(dirs["eu"] / "state", eu.address).band(device)
                async with grpc.aio.secure_channel(us.address, identity.credentials()) as ch:
                    up = Uploader(ch, device)
                    with contextlib.suppress(grpc.aio.AioRpcError, AssertionError):
                        await up.send(batches[0])
                    away = (await up.call.code(), dict(await up.call.trailing_metadata() or ()))
                async with grpc.aio.secure_channel(eu.address, identity.credentials()) as ch:
                    up = Uploader(ch, device)
                    home = [(await up.send(b)).code for b in batches]
                await drained(eu)
                await drained(us)
                return away, home, eu.address

    (code, trailers), home, eu_address = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert trailers[HOME_REGION_TRAILER] == "eu" and trailers[HOME_ADDRESS_TRAILER] == eu_address
    assert home == [OK] * len(batches)

    eu, us = region_services["eu"], region_services["us"]
    expected = sorted(processed(batches), key=key)
    assert sorted(read_store(dirs["eu"], eu["store"], eu["key_schema"]), key=key) == expected
    assert sorted((record_of(b) for *_, b in stream_of(eu["stream"])), key=key) == expected
    assert rows_naming((eu["schema"],), name)  # the check below can see a device where it is
    assert rows_naming((us["schema"], us["key_schema"]), name) == {}
    assert stream_of(us["stream"]) == []
