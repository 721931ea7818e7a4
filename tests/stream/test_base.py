"""The message layout, the stream URL, the outbox bounds and the reader permissions: no server needed."""

from __future__ import annotations

import msgpack
import pytest

from decoder.records import FAMILIES
from gateway.config import ConfigError, GatewayConfig
from gateway.store import outbox_url, store_for_url
from gateway.store.base import OutboxRow
from gateway.store.postgres import DEFAULT_LOCK_TIMEOUT_MS, DEFAULT_POOL_TIMEOUT_S, OUTBOX_LEASE_S
from gateway.stream import (
    FeatureStream,
    check_stream_url,
    decode_message,
    message_of,
    messages_of,
    records_of,
)
from gateway.stream.base import (
    BACKOFF_MAX_S,
    CRASH_BOUND_S,
    DUPLICATE_WINDOW_S,
    LAYOUT_VERSION,
    PUBLISH_TIMEOUT_S,
    ROUND_BUDGET_S,
)
from gateway.stream.nats import NatsStream, parse_nats_url, reader_permissions, stream_name, subject

DEV = "f123456789abcdef"
RECORD = {
    "family": "heart",
    "device": DEV,
    "start_us": 1_767_225_600_000_000,
    "duration_s": 300,
    "algo": "heart/1",
    "values": {"hr_bpm": 61.25, "label": "résumé", "n": 3, "ok": True},
}


def test_a_message_is_the_record_its_cursor_and_layout_under_the_record_key() -> None:
    m = message_of(OutboxRow(9, DEV, "o-1a2b", 41, RECORD, 0))
    assert (m.outbox_ids, m.family, m.device) == ((9,), "heart", DEV)
    assert m.msg_id == f"{DEV}/heart/1767225600000000/o-1a2b"
    body = decode_message(m.payload)
    record = {k: RECORD[k] for k in ("start_us", "duration_s", "algo", "values")}
    assert body == {
        "v": LAYOUT_VERSION,
        "device": DEV,
        "family": "heart",
        "records": [{"cursor": 41, **record}],
    }
    assert records_of(m.payload) == [{"cursor": 41, **RECORD}]
    assert (
        type(body["records"][0]["values"]["hr_bpm"]) is float and body["records"][0]["values"]["ok"] is True
    )
    # the same record taken again (a republish) is the same message: the stream's dedup key
    assert message_of(OutboxRow(10, DEV, "o-1a2b", 41, dict(RECORD), 5)).msg_id == m.msg_id
    assert message_of(OutboxRow(9, DEV, "", 41, RECORD, 0)).msg_id.endswith("/-")
    assert "61.25" not in repr(m) and "hr_bpm" not in repr(m)


def later(minutes: int, family: str = "heart") -> dict:
    return {**RECORD, "family": family, "start_us": RECORD["start_us"] + minutes * 60_000_000}


def test_a_batchs_entries_of_a_family_are_one_message_under_its_first_records_key() -> None:
    """Entries of one batch (their commit's first cursor) go out as one message a family, in entry order;
    the same entries taken again make the same messages; an entry without a batch is a message alone."""
    rows = [
        OutboxRow(1, DEV, "", 40, None, 0),  # a purge entry: no message
        OutboxRow(2, DEV, "", 41, later(0), 0, batch=41),
        OutboxRow(3, DEV, "", 42, later(0, "steps"), 0, batch=41),
        OutboxRow(4, DEV, "", 43, later(1), 0, batch=41),
        OutboxRow(5, DEV, "", 44, later(2), 0, batch=44),
        OutboxRow(6, DEV, "", 45, later(3), 0),
    ]
    messages = messages_of(rows)
    assert [(m.outbox_ids, m.family) for m in messages] == [
        ((2, 4), "heart"),
        ((3,), "steps"),
        ((5,), "heart"),
        ((6,), "heart"),
    ]
    assert [m.msg_id for m in messages] == [
        f"{DEV}/heart/{later(0)['start_us']}/-",
        f"{DEV}/steps/{later(0)['start_us']}/-",
        f"{DEV}/heart/{later(2)['start_us']}/-",
        f"{DEV}/heart/{later(3)['start_us']}/-",
    ]
    assert [r["cursor"] for r in records_of(messages[0].payload)] == [41, 43]
    assert [r["start_us"] for r in records_of(messages[0].payload)] == [
        later(0)["start_us"],
        later(1)["start_us"],
    ]
    again = [OutboxRow(r.id, r.device, r.ownership, r.cursor, r.record, 7, r.batch) for r in rows]
    assert messages_of(again) == messages  # taken again: the same messages, IDs and bytes


def test_a_purge_entry_is_no_message_and_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError):
        message_of(OutboxRow(1, DEV, "", None, None, 0))
    with pytest.raises(ValueError, match="layout"):
        decode_message(msgpack.packb({"v": LAYOUT_VERSION + 1, **RECORD}))


def test_a_layout_1_message_still_reads_as_its_record() -> None:
    """Streams written before layout 2 hold a record a message: a reader of layout 2 reads them too."""
    v1 = msgpack.packb({"v": 1, "cursor": 41, **RECORD})
    assert records_of(v1) == [{"cursor": 41, **RECORD}]


def test_the_duplicate_window_covers_the_crash_bound_which_covers_a_running_drainer() -> None:
    """A taken entry is done or taken again within CRASH_BOUND_S; the stream dedups over twice that."""
    assert PUBLISH_TIMEOUT_S + BACKOFF_MAX_S < CRASH_BOUND_S
    assert DUPLICATE_WINDOW_S >= 2 * CRASH_BOUND_S
    stream = NatsStream(["nats://127.0.0.1:4222"], retention_days={"heart": 90})
    assert stream.stream_config("heart").duplicate_window == DUPLICATE_WINDOW_S
    assert stream.stream_config("heart").max_age == 90 * 86_400
    assert stream.stream_config("steps").max_age is None  # kept until erased
    assert stream.stream_config("steps").subjects == ["bandgate.steps.*"]
    assert isinstance(stream, FeatureStream)


def test_a_round_ends_well_within_the_lease_a_store_lends_a_page_for() -> None:
    """A running drainer's round (the budget, then one purge of every family or one publish and its
    acks, then the store call that marks them done) ends before PostgreSQL lends its devices to another
    drainer; a crashed drainer's devices go to another well within the crash bound."""
    store_call_s = DEFAULT_POOL_TIMEOUT_S + DEFAULT_LOCK_TIMEOUT_MS / 1000
    one_action_s = max(len(FAMILIES) * PUBLISH_TIMEOUT_S, 2 * PUBLISH_TIMEOUT_S)
    assert ROUND_BUDGET_S + one_action_s + store_call_s < OUTBOX_LEASE_S
    assert OUTBOX_LEASE_S + BACKOFF_MAX_S + ROUND_BUDGET_S < CRASH_BOUND_S


def test_stream_urls() -> None:
    assert parse_nats_url("nats://u:p%40ss@h1:4222,h2:4223?prefix=fleet-a") == (
        ["nats://h1:4222", "nats://h2:4223"],
        "u",
        "p@ss",
        "fleet-a",
    )
    assert parse_nats_url("nats://127.0.0.1:4222")[3] == "bandgate"
    for bad in ("nats://h", "http://h:1", "nats://h:1?prefix=A", "nats://h:1?prefix=a.b", "nats://h:1?x=1"):
        with pytest.raises(ValueError):
            check_stream_url(bad)
    with pytest.raises(ConfigError, match="stream"):
        GatewayConfig(stream="nats://h:1?prefix=Bad").validate()
    GatewayConfig(stream="nats://h:1").validate()
    GatewayConfig(stream="nats://h:1", store="postgresql://db.example/bandgate").validate()  # both outboxes
    assert "secret" not in repr(NatsStream.from_url("nats://u:secret@h:1"))


def test_names() -> None:
    assert stream_name("fleet-a", "steps") == "FLEET-A_STEPS"
    assert subject("fleet-a", "steps", DEV) == f"fleet-a.steps.{DEV}"
    assert outbox_url("sqlite:///x.db") == "sqlite:///x.db?outbox=1"
    assert outbox_url("sqlite:///x.db?busy_timeout_ms=5") == "sqlite:///x.db?busy_timeout_ms=5&outbox=1"
    pg = outbox_url("postgresql://u:pw@db.example/bandgate?schema=fleet")
    assert pg == "postgresql://u:pw@db.example/bandgate?schema=fleet&outbox=1"
    assert store_for_url(pg).outbox and not store_for_url("postgresql://db.example/bandgate").outbox


def test_a_reader_may_use_its_family_stream_and_its_own_inbox_only() -> None:
    perms = reader_permissions("p", "steps", "_INBOX_steps")
    allowed = perms["publish"]["allow"]
    assert all("P_STEPS" in s or s == "$JS.API.INFO" for s in allowed)
    assert perms["subscribe"]["allow"] == ["_INBOX_steps.>"]
    assert not any(s.startswith("p.") for s in allowed)  # publishes no data


def test_a_message_entry_is_published_as_it_is_among_record_entries() -> None:
    """A message entry (what a store writes since message entries) is its own message, with the ID it
    carries; record entries an older gateway left around it are grouped as before, in id order."""
    body = msgpack.packb({"v": 2, "device": DEV, "family": "heart", "records": []})
    rows = [
        OutboxRow(1, DEV, "", 40, later(0), 0, batch=40),
        OutboxRow(2, DEV, "o-1a2b", None, None, 5, None, body, "heart", 123, 7),
        OutboxRow(3, DEV, "", None, None, 0),  # a purge entry: no message
    ]
    assert not rows[1].is_purge and rows[2].is_purge
    messages = messages_of(rows)
    assert [(m.outbox_ids, m.record_count) for m in messages] == [((1,), 1), ((2,), 7)]
    assert messages[1].payload is body and messages[1].msg_id == f"{DEV}/heart/123/o-1a2b"
    assert "7 records" in repr(messages[1]) and "values" not in repr(messages[1])  # no payload
