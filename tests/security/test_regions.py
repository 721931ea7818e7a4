"""Each band's data stays in its home region: two gateways, two regions (eu, us), each its own store and
state dir, one CA. A band enrolled in eu that reaches us gets FAILED_PRECONDITION with its home region and
address in trailers, and us keeps nothing of it (no records, no registration even with auto-registration
on, no device row); in eu it streams. The home region travels in the certificate and survives renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3

import grpc
import pytest

from gateway.config import ConfigError
from gateway.pipeline import OK
from gateway.regions import HOME_ADDRESS_TRAILER, HOME_REGION_TRAILER, Regions, parse_regions
from gateway.security import setup as security_setup
from gateway.security.client import ClientIdentity
from gateway.security.pki import (
    CertificateAuthority,
    Identity,
    LocalState,
    PkiError,
    cert_info,
    make_csr,
    new_key,
)
from gateway.server import run_server
from tests.gateway.gatewaykit import Credentials, Uploader, band, processed, stored, tls_config


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))  # a hang bound, not a speed check


# --- the rules, directly --------------------------------------------------------------------------


def test_region_settings_are_checked(tmp_path) -> None:
    assert parse_regions(" eu = eu.example:443 , us=us.example:443,") == {
        "eu": "eu.example:443",
        "us": "us.example:443",
    }
    for bad in ["eu", "eu=", "EU=x:1", "eu=x:1,eu=y:1", "1eu=x:1"]:
        with pytest.raises(ValueError, match="regions"):
            parse_regions(bad)
    with pytest.raises(ValueError, match="region: ap is not one of regions"):
        Regions.from_settings("ap", "eu=x:1,us=y:1", "")
    with pytest.raises(ValueError, match="need this gateway's own region"):
        Regions.from_settings("", "eu=x:1", "")
    with pytest.raises(ConfigError, match="region_default"):
        tls_config(
            __import__("pathlib").Path("/tmp"), region="eu", regions="eu=x:1", region_default="us"
        ).validate()
    assert Regions.from_settings("eu", "", "").check(None) is None  # a token caller: its registry decides


def test_the_ca_stamps_the_home_region_and_a_csr_cannot_choose_another(tmp_path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca.pem", tmp_path / "ca.key")
    who = Identity.device(0xA1)
    cert, _ = ca.issue(who, region="eu")
    assert cert_info(cert).region == "eu" and cert_info(cert).identity == who
    assert cert_info(ca.issue(who)[0]).region is None
    key = new_key()
    assert cert_info(ca.sign_csr(make_csr(key, who), identity=who, region="us")).region == "us"
    with pytest.raises(PkiError, match="region name"):
        ca.issue(who, region="Not A Region")
    regions = Regions.from_settings("eu", "eu=eu.example:1,us=us.example:2", "")
    assert regions.check(cert) is None
    away = regions.check(ca.issue(who, region="us")[0])
    assert away is not None and dict(away.trailers) == {
        HOME_REGION_TRAILER: "us",
        HOME_ADDRESS_TRAILER: "us.example:2",
    }
    unregioned = regions.check(ca.issue(who)[0])
    assert unregioned is not None and unregioned.home == "none"
    assert Regions.from_settings("eu", "eu=a:1,us=b:2", "eu").check(ca.issue(who)[0]) is None


# --- two gateways, two regions -------------------------------------------------------------------


def rows_of(db, device: str) -> dict[str, int]:
    """Every table of a gateway's database that names the device, with its row count."""
    out = {}
    with contextlib.closing(sqlite3.connect(db)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            for column in {"device", "name"} & set(columns):
                n = conn.execute(f"SELECT count(*) FROM {table} WHERE {column} = ?", (device,)).fetchone()[0]
                if n:
                    out[f"{table}.{column}"] = n
    return out


def test_a_band_of_one_region_is_sent_home_by_the_other_and_nothing_of_it_is_kept_there(tmp_path) -> None:
    eu_dir, us_dir = tmp_path / "eu", tmp_path / "us"
    eu_dir.mkdir()
    us_dir.mkdir()
    eu_cfg = tls_config(eu_dir, region="eu")
    security_setup.prepare(eu_cfg)  # the CA both regions share (a region's own CA would do as well)
    shutil.copytree(eu_dir / "state", us_dir / "state")
    device, batches = band()
    name = f"{device:016x}"

    async def scenario():
        async with run_server(eu_cfg) as eu:
            us_cfg = tls_config(
                us_dir, region="us", regions=f"eu={eu.address},us=us.bandgate.example:443", auto_register=True
            )
            async with run_server(us_cfg) as us:
                creds = Credentials(eu_dir / "state", eu.address)
                identity = await creds.band(device)  # enrolled through eu's admin API: eu's CA stamp
                async with grpc.aio.secure_channel(us.address, identity.credentials()) as ch:
                    up = Uploader(ch, device)
                    with contextlib.suppress(grpc.aio.AioRpcError, AssertionError):
                        await up.send(batches[0])
                    away = (
                        await up.call.code(),
                        await up.call.details(),
                        dict(await up.call.trailing_metadata() or ()),
                    )
                misrouted = us.metrics.misrouted._value.get()
                async with grpc.aio.secure_channel(eu.address, identity.credentials()) as ch:
                    up = Uploader(ch, device)
                    home = [(await up.send(b)).code for b in batches[:3]]
                return identity, away, misrouted, home, eu.address

    identity, (code, details, trailers), misrouted, home, eu_address = run(scenario())
    assert cert_info(identity.cert_pem).region == "eu"
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
    assert "home region of this band is eu" in details
    assert trailers[HOME_REGION_TRAILER] == "eu" and trailers[HOME_ADDRESS_TRAILER] == eu_address
    assert misrouted == 1
    assert home == [OK] * 3
    assert rows_of(us_dir / "gw.db", name) == {}  # not registered, not stored, not even a device row
    assert stored(f"sqlite:///{us_dir}/gw.db") == []
    assert stored(eu_cfg.store) == processed(batches[:3])


def test_a_renewed_certificate_keeps_its_home_region(tmp_path) -> None:
    cfg = tls_config(tmp_path, region="eu", regions="eu=eu.example:443,us=us.example:443")
    device = 0xB0B
    state = LocalState.at(tmp_path / "state")

    async def scenario():
        async with run_server(cfg) as gw:
            creds = Credentials(state.root, gw.address)
            # a band enrolled in us (its CA stamp), renewing through this eu gateway keeps us
            ca = CertificateAuthority.load(state.ca_cert, state.ca_key)
            await creds.band(device)  # registered here
            us_cert, us_key = ca.issue(Identity.device(device), region="us")
            us_band = ClientIdentity(us_cert, us_key, state.ca_cert.read_bytes())
            from cryptography.hazmat.primitives import serialization

            from bandgate.v1 import admin_pb2, admin_pb2_grpc

            key = serialization.load_pem_private_key(us_key, None)
            async with grpc.aio.secure_channel(gw.address, us_band.credentials()) as ch:
                reply = await admin_pb2_grpc.IdentityServiceStub(ch).Renew(
                    admin_pb2.RenewRequest(csr_pem=make_csr(key, Identity.device(device)))
                )
            return reply

    reply = run(scenario())
    assert cert_info(reply.certificate_pem).region == "us"
