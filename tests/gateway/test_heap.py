"""gateway/heap.py: a serving process freezes its start-up heap and makes full collections rare, and its
cyclic garbage is still collected. Each check runs in a fresh interpreter: `settle` changes the whole
interpreter's collector, which pytest's own must not inherit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.gateway.gatewaykit import REPO, ServeProcess, wait_until

PROBE = textwrap.dedent(
    """
    import gc, json, weakref

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return a

    kept = [cycle() for _ in range(20_000)]  # start-up state the process keeps for its life
    replaced = Node()  # start-up state dropped later (a policy the registry replaces)
    replaced_ref = weakref.ref(replaced)
    before = len(gc.get_objects())

    from gateway import heap

    frozen = heap.settle()
    after = len(gc.get_objects())
    threshold = gc.get_threshold()
    del replaced

    garbage = cycle()  # made after the freeze and dropped: only the collector can free a cycle
    gone = weakref.ref(garbage)
    del garbage
    churn = [[] for _ in range(50_000)]  # young collections only, on their own thresholds
    del churn
    garbage_collected = gone() is None
    full_before = gc.get_stats()[2]["collections"]
    streams = [[] for _ in range(300_000)]  # state that piles up after start: 3 full collections by default
    full_collections = gc.get_stats()[2]["collections"] - full_before
    print(json.dumps({
        "frozen": frozen,
        "freeze_count": gc.get_freeze_count(),
        "before": before,
        "after": after,
        "threshold": threshold,
        "oldest": heap.OLDEST_THRESHOLD,
        "garbage_collected": garbage_collected,
        "full_collections": full_collections,
        "frozen_freed_when_dropped": replaced_ref() is None,
    }))
    """
)


def _probe() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_settle_freezes_the_start_up_heap_out_of_every_later_collection():
    r = _probe()
    assert r["frozen"] >= 40_000  # the 20,000 kept cycles are two objects each
    assert r["after"] < r["before"] - 40_000  # no longer walked by any collection, full ones included
    # reference counting still frees a frozen object, and it leaves the frozen generation
    assert r["frozen_freed_when_dropped"] and r["freeze_count"] == r["frozen"] - 1


def test_after_settle_full_collections_are_rare_and_young_garbage_is_still_collected():
    r = _probe()
    assert r["threshold"][2] == r["oldest"] == 1000
    assert r["garbage_collected"]  # a cycle dropped after the freeze is freed by the young collections
    assert r["full_collections"] == 0  # 300,000 new long-lived objects, and no full collection


def test_serve_settles_its_heap_once_it_serves(tmp_path):
    server = ServeProcess(tmp_path, tmp_path / "gw.db")
    try:
        wait_until(lambda: any('"event":"heap_frozen"' in x for x in server.lines), 30)  # just after SERVING
        lines = [json.loads(x) for x in server.lines if '"event":"heap_frozen"' in x]
        assert len(lines) == 1, server.lines
        assert lines[0]["objects"] > 10_000  # modules, the registry's policy, grpc's server
        assert lines[0]["oldest_threshold"] == 1000
    finally:
        assert server.terminate() == 0
