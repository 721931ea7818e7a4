"""Right of access and correction (issue 13, items 2 and 4), against the real server over mutual TLS: the
export holds exactly the device's current ownership (features, consent, profile versions, audit entries)
and nothing of anyone else; a corrected profile shows in the `distance` records computed after it; a
resold band's new owner sees nothing of the last one's."""

from __future__ import annotations

import io

import msgpack

from bandgate.v1 import admin_pb2, admin_pb2_grpc, privacy_pb2
from decoder.records import FAMILIES
from gateway.pipeline import OK as ACK_OK
from tests.gateway.gatewaykit import Uploader, band, stored
from tests.privacy.privacykit import OK, Owner, hexid, lines, privacy_gateway, run, send_all


def test_export_holds_exactly_the_devices_data_and_corrections_show_in_new_distance_records(tmp_path):
    a, a_batches = band(seed=61, minutes=30, batch_minutes=5)
    b, b_batches = band(seed=62, minutes=30, batch_minutes=5)

    async def scenario():
        async with privacy_gateway(tmp_path) as (_gw, creds, cfg):
            async with await creds.band_channel(b) as ch:
                other = Owner(ch, b)
                await other.profile(birth_year=1970, country="NL", height_cm=201.5)
                await other.consent(grant=FAMILIES)
                up = Uploader(ch, b)
                await send_all(up, b_batches)
                await up.close()
            async with await creds.band_channel(a) as ch:
                owner = Owner(ch, a)
                await owner.profile(birth_year=1990, country="DE", height_cm=170.0, sex="female")
                await owner.consent(grant=FAMILIES)
                up = Uploader(ch, a)
                first = await send_all(up, a_batches[:3])
                corrected = await owner.profile(height_cm=187.3456)  # a correction: version 2
                second = await send_all(up, a_batches[3:])
                await up.close()
                exported = await owner.export()
                packed = await owner.export(fmt="msgpack")
            return cfg, first + second, corrected, exported, packed

    cfg, acks, corrected, exported, packed = run(scenario())
    assert [x.code for x in acks] == [ACK_OK] * len(a_batches)
    assert corrected.code == OK and corrected.reply.version == 2
    assert corrected.reply.profile.height_cm == 187.3456

    out = lines(exported.reply)
    # the msgpack export holds the same, and the audit entry of the JSON export before it
    assert list(msgpack.Unpacker(io.BytesIO(packed.reply), raw=False))[:-1] == out
    kinds = [o["kind"] for o in out]
    assert kinds[0] == "device" and out[0]["device"] == hexid(a)
    # every feature of A, as stored, and nothing of B
    fields = ("family", "device", "start_us", "duration_s", "algo", "values")
    features = [{k: o[k] for k in fields} for o in out if o["kind"] == "feature"]
    assert features == stored(cfg.store, device=hexid(a))
    assert all(f["device"] == hexid(a) for f in features)
    assert hexid(b) not in exported.reply.decode()
    # both profile versions, the consent decision per family, and A's own audit entries
    profiles = [o for o in out if o["kind"] == "profile"]
    assert [(p["version"], p["height_cm"]) for p in profiles] == [(1, 170.0), (2, 187.3456)]
    assert {o["family"] for o in out if o["kind"] == "consent"} == set(FAMILIES)
    audit = [o for o in out if o["kind"] == "audit"]
    assert {"consent.changed", "profile.created", "profile.corrected"} <= {o["action"] for o in audit}
    assert all(hexid(a) in (o["subject"] + o["actor"]) for o in audit)

    # distance names the profile version its stride came from: the correction shows after it
    distance = [r for r in stored(cfg.store, device=hexid(a)) if r["family"] == "distance"]
    versions = [r["values"]["profile_version"] for r in sorted(distance, key=lambda r: r["start_us"])]
    assert versions and set(versions) == {1, 2} and versions == sorted(versions)
    v2 = next(r for r in distance if r["values"]["profile_version"] == 2)
    assert v2["values"]["stride_m"] == round(187.3456 / 100 * 0.413, 4)


def test_a_transfer_starts_a_new_ownership_that_sees_nothing_of_the_last(tmp_path):
    device, batches = band(seed=63, minutes=30, batch_minutes=5)

    async def scenario():
        async with privacy_gateway(tmp_path) as (_gw, creds, cfg):
            async with await creds.band_channel(device) as ch:
                owner = Owner(ch, device)
                await owner.profile(birth_year=1980, country="IT", height_cm=175.0)
                await owner.consent(grant=FAMILIES)
                up = Uploader(ch, device)
                await send_all(up, batches[:3])
                await up.close()
            async with creds.channel("operator") as op:
                moved = await admin_pb2_grpc.AdminServiceStub(op).Transfer(
                    admin_pb2.TransferRequest(device=hexid(device))
                )
            async with await creds.band_channel(device) as ch:
                new_owner = Owner(ch, device)
                state = (await new_owner.consent()).reply
                profile = await new_owner.stub.GetProfile(privacy_pb2.DeviceRequest())
                await new_owner.profile(birth_year=1995, country="ES")
                await new_owner.consent(grant=["steps"])
                up = Uploader(ch, device)
                await send_all(up, batches[3:])
                await up.close()
                exported = await new_owner.export()
            return cfg, moved, state, profile, exported

    cfg, moved, state, profile, exported = run(scenario())
    assert moved.previous and moved.ownership and moved.ownership != moved.previous
    assert not state.processing and all(not f.granted for f in state.families)  # nothing carried over
    assert profile.version == 0 and not profile.profile.HasField("height_cm")
    out = lines(exported.reply)
    assert out[0]["ownership"] == moved.ownership
    features = [o for o in out if o["kind"] == "feature"]
    assert features and {o["family"] for o in features} == {"steps"}
    everything = stored(cfg.store, device=hexid(device))
    assert len(everything) > len(features)  # the last owner's records stay, theirs alone
    assert [o["country"] for o in out if o["kind"] == "profile"] == ["ES"]
    assert "IT" not in {o.get("country") for o in out}
