"""Consent per device × family (issue 13, item 1), against the real server over mutual TLS: enforced at stream
open and on every batch, by the owner through the PrivacyService with the band's own certificate."""

from __future__ import annotations

import orjson

from bandgate.v1 import privacy_pb2
from decoder.records import FAMILIES
from gateway.pipeline import OK as ACK_OK
from gateway.pipeline import PERMISSION_DENIED as ACK_DENIED
from gateway.store import open_store
from tests.gateway.gatewaykit import Uploader, audit_name, band, gateway_store, stored
from tests.privacy.privacykit import (
    DENIED,
    OK,
    Owner,
    hexid,
    high_water,
    privacy_gateway,
    refused_stream,
    run,
    send_all,
)


def cursor_now(url: str) -> int:
    with open_store(url) as store:
        return store.latest_cursor()


def records_after(url: str, device_id: int, cursor: int) -> list[dict]:
    with gateway_store(url) as store:
        return [r for c, r in store.read_since(cursor, device=hexid(device_id), limit=10**9)]


def test_withdrawal_mid_stream_stops_that_family_at_the_next_batch_and_the_others_go_on(tmp_path):
    device, batches = band(seed=41, minutes=40, batch_minutes=5)

    async def scenario():
        async with privacy_gateway(tmp_path) as (_gw, creds, cfg):
            async with await creds.band_channel(device) as ch:
                owner = Owner(ch, device)
                assert (await owner.profile(birth_year=1990, country="DE")).code == OK
                granted = await owner.consent(grant=FAMILIES)
                up = Uploader(ch, device)
                before = await send_all(up, batches[:3])
                mark = cursor_now(cfg.store)
                withdrawn = await owner.consent(withdraw=["heart", "day"])
                after = await send_all(up, batches[3:6])
                mark2 = cursor_now(cfg.store)
                nothing = await owner.consent(withdraw=FAMILIES)
                refused = await up.send(batches[6])
                status = await up.close()
            return cfg, granted, before, mark, withdrawn, after, mark2, nothing, refused, status

    cfg, granted, before, mark, withdrawn, after, mark2, nothing, refused, _status = run(scenario())
    assert granted.reply.processing and {f.family for f in granted.reply.families if f.granted} == set(
        FAMILIES
    )
    assert [a.code for a in before] == [ACK_OK] * 3
    assert withdrawn.code == OK and withdrawn.reply.processing
    assert {f.family for f in withdrawn.reply.families if not f.granted} == {"heart", "day"}
    assert [a.code for a in after] == [ACK_OK] * 3
    late = records_after(cfg.store, device, mark)
    assert late, "the batches after the withdrawal stored their other families"
    assert not {"heart", "day"} & {r["family"] for r in late}, "a withdrawn family committed after withdrawal"
    assert {"steps", "activity"} <= {r["family"] for r in late}
    early = records_after(cfg.store, device, 0)
    assert "heart" in {r["family"] for r in early}  # stored before the withdrawal: kept until erasure
    assert not nothing.reply.processing and "no consent" in nothing.reply.reason
    assert refused.code == ACK_DENIED and "no consent" in refused.reason
    assert records_after(cfg.store, device, mark2) == []  # nothing of the refused batch
    assert high_water(cfg.store, device) == batches[5].last_seq


def test_a_device_without_consent_is_refused_at_stream_open_and_nothing_is_stored(tmp_path):
    device, batches = band(seed=42, minutes=10, batch_minutes=5)

    async def scenario():
        async with privacy_gateway(tmp_path) as (_gw, creds, cfg):
            async with await creds.band_channel(device) as ch:
                opened = await refused_stream(ch, device, batches[0])
                state = await Owner(ch, device).stub.GetConsent(privacy_pb2.DeviceRequest())
            return cfg, opened, state

    cfg, (code, details, acks), state = run(scenario())
    assert code == DENIED and "no consent for any feature family" in details and acks == []
    assert not state.processing and all(not f.granted for f in state.families)
    assert stored(cfg.store) == [] and high_water(cfg.store, device) is None


def test_the_operators_default_set_applies_to_a_new_device_until_its_owner_decides(tmp_path):
    device, batches = band(seed=43, minutes=20, batch_minutes=5)

    async def scenario():
        async with privacy_gateway(tmp_path, default_consent="steps", age_unknown="adult") as (
            _gw,
            creds,
            cfg,
        ):
            async with await creds.band_channel(device) as ch:
                up = Uploader(ch, device)
                first = await send_all(up, batches[:2])
                await Owner(ch, device).consent(withdraw=["steps"], grant=["activity"])
                second = await send_all(up, batches[2:])
                await up.close()
            return cfg, first, second

    cfg, first, second = run(scenario())
    assert [a.code for a in first + second] == [ACK_OK] * 4
    families = {r["family"] for r in stored(cfg.store)}
    assert families == {"steps", "activity"}


def test_consent_changes_are_audited_by_family_never_by_value(tmp_path):
    device, _ = band(seed=44, minutes=10, batch_minutes=5)

    async def scenario():
        async with privacy_gateway(tmp_path) as (_gw, creds, cfg):
            async with await creds.band_channel(device) as ch:
                owner = Owner(ch, device)
                await owner.profile(birth_year=1988, country="FR", height_cm=187.3456)
                await owner.consent(grant=["steps", "heart"])
                await owner.consent(withdraw=["heart"])
                bad = await owner.consent(grant=["raw_accel"])
                both = await owner.consent(grant=["steps"], withdraw=["steps"])
            return cfg, bad, both

    cfg, bad, both = run(scenario())
    assert bad.code.name == "INVALID_ARGUMENT" and "raw_accel" in bad.details
    assert both.code.name == "INVALID_ARGUMENT"
    with open_store(cfg.store) as store:
        entries = [orjson.loads(r.entry) for r in store.audit_rows(0, 10_000)]
    changes = [e for e in entries if e["action"] == "consent.changed"]
    by = f"device:{audit_name(cfg.state_dir, device)}"  # the band, by its pseudonym
    assert [(e["actor"], e["details"]) for e in changes] == [
        (by, {"granted": "heart,steps", "withdrawn": ""}),
        (by, {"granted": "", "withdrawn": "heart"}),
    ]
    text = "\n".join(orjson.dumps(e).decode() for e in entries)
    assert "187.3456" not in text and "1988" not in text and hexid(device) not in text


def test_the_registry_indexes_consent_ahead_so_a_batch_never_builds_the_index(tmp_path, monkeypatch):
    """`RegistryConsent.prepare` (the registry calls it on its store thread before serving a version):
    the batches that follow decide from that index and build none themselves; a version that was not
    prepared is still decided right, by building its index once."""
    from gateway.privacy import consent as consent_module
    from gateway.privacy.consent import ConsentIndex, ConsentSettings, RegistryConsent
    from gateway.store import SqliteStore
    from gateway.store.base import RegistryOp

    built: list[int] = []

    class Counted(ConsentIndex):
        def __init__(self, snapshot):  # type: ignore[no-untyped-def]
            built.append(snapshot.version)
            super().__init__(snapshot)

    monkeypatch.setattr(consent_module, "ConsentIndex", Counted)
    device, ownership = "00000000000000d1", "o-00000000000000d1"
    with SqliteStore(tmp_path / "gw.db") as store:
        store.registry_apply(
            [
                RegistryOp("ownership", device=device, ownership=ownership),
                RegistryOp(
                    "consent", device=device, ownership=ownership, family="steps", granted=True, actor="owner"
                ),
            ]
        )
        first = store.registry_snapshot()
        store.registry_apply(
            [
                RegistryOp(
                    "consent", device=device, ownership=ownership, family="heart", granted=True, actor="owner"
                )
            ]
        )
        second = store.registry_snapshot()
    served = [first]
    gate = RegistryConsent(lambda: served[0], None, ConsentSettings(age_unknown="adult"))
    gate.prepare(first)
    assert built == [first.version]
    for _ in range(3):
        assert gate.decide(0xD1).families == {"steps"}
    assert gate.explain(device)[0].decisions == {"steps": True}
    assert built == [first.version]  # the batches and the owner's view used the prepared index
    served[0] = second  # a version nobody prepared (the fallback)
    assert gate.decide(0xD1).families == {"steps", "heart"}
    assert built == [first.version, second.version]


def test_a_registry_delta_updates_the_consent_index_by_the_devices_it_touched(tmp_path, monkeypatch):
    """`prepare(snapshot, delta)` indexes only the devices the change touched when the index prepared
    before is of the snapshot the delta was read after; otherwise (a delta from elsewhere) it indexes
    the whole snapshot. Either way batches are decided by the new state."""
    from gateway.privacy import consent as consent_module
    from gateway.privacy.consent import ConsentIndex, ConsentSettings, RegistryConsent
    from gateway.store import SqliteStore
    from gateway.store.base import RegistryOp, merge_registry

    indexed: list[int] = []  # ownerships each index build went through

    class Counted(ConsentIndex):
        def __init__(self, snapshot):  # type: ignore[no-untyped-def]
            indexed.append(len(snapshot.ownerships))
            super().__init__(snapshot)

    monkeypatch.setattr(consent_module, "ConsentIndex", Counted)
    devices = [f"{0xD0 + i:016x}" for i in range(5)]

    def consent(device: str, family: str) -> RegistryOp:
        return RegistryOp(
            "consent", device=device, ownership=f"o-{device}", family=family, granted=True, actor="o"
        )

    with SqliteStore(tmp_path / "gw.db") as store:
        store.registry_apply(
            [RegistryOp("ownership", device=d, ownership=f"o-{d}") for d in devices]
            + [consent(d, "steps") for d in devices]
        )
        first = store.registry_snapshot()
        store.registry_apply([consent(devices[2], "heart")])
        delta = store.registry_delta(first)
        assert delta is not None and delta.subjects == {f"device:{devices[2]}"}
        second = merge_registry(first, delta)
        store.registry_apply([consent(devices[3], "heart")])
        third = store.registry_snapshot()
    served = [first]
    gate = RegistryConsent(lambda: served[0], None, ConsentSettings(age_unknown="adult"))
    gate.prepare(first)
    assert indexed == [5]
    served[0] = second
    gate.prepare(second, delta)
    assert indexed == [5, 1]  # the one device the change touched
    assert gate.decide(0xD2).families == {"steps", "heart"}
    assert gate.decide(0xD3).families == {"steps"} and gate.decide(0xD4).families == {"steps"}
    assert indexed == [5, 1]  # the batches used the prepared index
    served[0] = third
    gate.prepare(third, delta)  # a delta read after `first`, but the index is of `second`: built whole
    assert indexed == [5, 1, 5]
    assert gate.decide(0xD3).families == {"steps", "heart"}
