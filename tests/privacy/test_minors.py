"""No data from minors without a guardian's consent (issue 13, item 3), against the real server over mutual
TLS: the age of digital consent by country, counted conservatively from the birth year; a guardian's
consent only through the operator's path, never with the band's own credential."""

from __future__ import annotations

import datetime

import grpc
import pytest

from bandgate.v1 import privacy_pb2, privacy_pb2_grpc
from decoder.records import FAMILIES
from gateway.pipeline import OK as ACK_OK
from gateway.pipeline import PERMISSION_DENIED as ACK_DENIED
from gateway.privacy.minors import ConsentAges
from gateway.privacy.profile import Profile
from tests.gateway.gatewaykit import Uploader, band, stored
from tests.privacy.privacykit import DENIED, OK, Owner, call, hexid, privacy_gateway, refused_stream, run

YEAR = datetime.date.today().year


def test_a_minor_is_refused_until_the_operator_records_a_guardian_and_never_by_the_bands_own_credential(
    tmp_path,
):
    device, batches = band(seed=51, minutes=20, batch_minutes=5)

    async def scenario():
        async with (
            privacy_gateway(tmp_path) as (_gw, creds, cfg),
            await creds.band_channel(device) as ch,
            creds.channel("operator") as op,
        ):
            owner = Owner(ch, device)
            operator = privacy_pb2_grpc.PrivacyServiceStub(op)
            await owner.profile(birth_year=YEAR - 12, country="DE")
            state = (await owner.consent(grant=FAMILIES)).reply
            refused = await refused_stream(ch, device, batches[0])
            form = privacy_pb2.GuardianRequest(device=hexid(device), guardian="consent-form-2291")
            by_band = await call(owner.stub.RecordGuardian, form)
            still = await refused_stream(ch, device, batches[0])
            recorded = await call(operator.RecordGuardian, form)
            up = Uploader(ch, device)
            accepted = [await up.send(b) for b in batches[:2]]
            form.withdraw = True
            withdrawn = await call(operator.RecordGuardian, form)
            again = await up.send(batches[2])  # the open stream: refused from the next batch on
            await up.close()
            return cfg, state, refused, by_band, still, recorded, accepted, withdrawn, again

    cfg, state, refused, by_band, still, recorded, accepted, withdrawn, again = run(scenario())
    assert not state.processing and "age of digital consent (16 in DE)" in state.reason
    assert refused[0] == DENIED and "guardian" in refused[1] and refused[2] == []
    assert by_band.code == DENIED and "operator" in by_band.details
    assert still[0] == DENIED
    assert recorded.code == OK and recorded.reply.guardian and recorded.reply.processing
    assert [a.code for a in accepted] == [ACK_OK, ACK_OK]
    assert withdrawn.code == OK and not withdrawn.reply.processing
    assert again.code == ACK_DENIED
    assert {r["device"] for r in stored(cfg.store)} == {hexid(device)}
    assert len(stored(cfg.store)) > 0


@pytest.mark.parametrize(
    ("age", "country", "processing"),
    [
        (14, "US", True),  # COPPA: 13
        (14, "DE", False),  # 16
        (14, "FR", False),  # 15, and 14 counts as 13 (born on 31 December, conservatively)
        (16, "FR", True),  # at least 15
        (15, "FR", False),  # born in that year: 14 or 15, so perhaps under 15
        (17, "ZZ", True),  # no entry: the default 16, at least 16
    ],
)
def test_the_age_is_counted_conservatively_against_the_countrys_age(age, country, processing):
    profile = Profile(birth_year=YEAR - age, country=country)
    youngest = profile.age_at_least()
    assert youngest == age - 1
    assert (youngest >= ConsentAges().age(country)) is processing


def test_an_unknown_age_follows_the_operators_setting(tmp_path):
    device, batches = band(seed=52, minutes=10, batch_minutes=5)

    async def outcome(age_unknown: str, sub: str):
        async with (
            privacy_gateway(tmp_path / sub, age_unknown=age_unknown) as (_gw, creds, _cfg),
            await creds.band_channel(device) as ch,
        ):
            await Owner(ch, device).consent(grant=["steps"])  # no profile at all
            if age_unknown == "minor":
                return await refused_stream(ch, device, batches[0])
            ack = await Uploader(ch, device).send(batches[0])
            return ack.code, ack.reason

    minor = run(outcome("minor", "a"))
    adult = run(outcome("adult", "b"))
    assert minor[0] == DENIED and "birth year is unknown" in minor[1]
    assert adult[0] == ACK_OK


def test_profile_values_out_of_range_are_refused_by_field_never_echoing_the_value(tmp_path):
    device, _ = band(seed=53, minutes=10, batch_minutes=5)

    async def scenario():
        async with privacy_gateway(tmp_path) as (_gw, creds, _cfg), await creds.band_channel(device) as ch:
            owner = Owner(ch, device)
            return [
                await owner.profile(birth_year=1700),
                await owner.profile(country="Germany"),
                await owner.profile(height_cm=987.654),
                await owner.profile(sex="robot"),
            ]

    results = run(scenario())
    assert [r.code for r in results] == [grpc.StatusCode.INVALID_ARGUMENT] * 4
    for r, field in zip(results, ("birth_year", "country", "height_cm", "sex"), strict=True):
        assert field in r.details
    assert "987.654" not in results[2].details
