"""The owner's optional second factor (issue 13, item 2), against the real server over mutual TLS: once
enrolled, consent changes, export and erasure need a current TOTP code; a code works once; the operator's
path needs none (it is audited instead)."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlparse

import grpc
import pyotp

from bandgate.v1 import privacy_pb2, privacy_pb2_grpc
from decoder.records import FAMILIES
from tests.gateway.gatewaykit import band
from tests.privacy.privacykit import OK, Owner, call, hexid, privacy_gateway, run

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def test_enrolled_owner_needs_a_fresh_code_and_a_replayed_one_is_refused(tmp_path):
    device, _ = band(seed=71, minutes=10, batch_minutes=5)

    async def scenario():
        async with (
            privacy_gateway(tmp_path) as (_gw, creds, _cfg),
            await creds.band_channel(device) as ch,
            creds.channel("operator") as op,
        ):
            owner = Owner(ch, device)
            await owner.profile(birth_year=1985, country="SE")
            before = await owner.consent(grant=FAMILIES)  # not enrolled yet: no code asked
            enrolled = await call(owner.stub.EnrolTotp, privacy_pb2.DeviceRequest())
            secret = parse_qs(urlparse(enrolled.reply.provisioning_uri).query)["secret"][0]
            totp = pyotp.TOTP(secret)
            wrong = f"{(int(totp.now()) + 1) % 10**6:06d}"
            out = {
                "no code": await owner.consent(withdraw=["heart"]),
                "wrong code": await owner.consent(withdraw=["heart"], totp=wrong),
                "export no code": await owner.export(),
                "erase no code": await owner.erase(),
            }
            code = totp.now()
            out["right code"] = await owner.consent(withdraw=["heart"], totp=code)
            out["replayed"] = await owner.consent(grant=["heart"], totp=code)
            out["re-enrol no code"] = await call(owner.stub.EnrolTotp, privacy_pb2.DeviceRequest())
            operator = privacy_pb2_grpc.PrivacyServiceStub(op)
            out["operator"] = await call(
                operator.SetConsent, privacy_pb2.SetConsentRequest(device=hexid(device), grant=["heart"])
            )
            # the next time step's code (a band's clock a little ahead) works, once
            ahead = totp.at(time.time() + 30)
            out["next step"] = await owner.export(totp=ahead)
            out["next step again"] = await owner.export(totp=ahead)
            return before, enrolled, out

    before, enrolled, out = run(scenario())
    assert before.code == OK and not before.reply.totp_enrolled
    assert enrolled.code == OK and enrolled.reply.provisioning_uri.startswith("otpauth://totp/")
    assert out["no code"].code == UNAUTHENTICATED and "TOTP code is required" in out["no code"].details
    assert out["wrong code"].code == UNAUTHENTICATED and out["wrong code"].details == "wrong TOTP code"
    assert out["export no code"].code == UNAUTHENTICATED
    assert out["erase no code"].code == UNAUTHENTICATED
    assert out["right code"].code == OK and out["right code"].reply.totp_enrolled
    assert not {f.family for f in out["right code"].reply.families if f.granted} & {"heart"}
    assert out["replayed"].code == UNAUTHENTICATED and "used already" in out["replayed"].details
    assert out["re-enrol no code"].code == UNAUTHENTICATED
    assert out["operator"].code == OK and {"heart"} <= {
        f.family for f in out["operator"].reply.families if f.granted
    }
    assert out["next step"].code == OK and out["next step"].reply
    assert out["next step again"].code == UNAUTHENTICATED


def test_the_secret_is_sealed_in_the_store_and_never_logged(tmp_path, caplog):
    device, _ = band(seed=72, minutes=10, batch_minutes=5)

    async def scenario():
        async with privacy_gateway(tmp_path) as (_gw, creds, _cfg), await creds.band_channel(device) as ch:
            owner = Owner(ch, device)
            enrolled = await call(owner.stub.EnrolTotp, privacy_pb2.DeviceRequest())
            return parse_qs(urlparse(enrolled.reply.provisioning_uri).query)["secret"][0]

    secret = run(scenario())
    files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert secret.encode() not in files
    assert secret not in caplog.text
