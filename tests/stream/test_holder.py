"""A drainer's lease name (gateway/stream/holder.py): one per live process, the same after a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from gateway.stream.holder import ID_FILE, claim_drainer_name
from tests.gateway.gatewaykit import REPO

_HOLD = """
import sys
from pathlib import Path
from gateway.stream.holder import claim_drainer_name
held = claim_drainer_name(Path(sys.argv[1]))  # held while referenced
print(held.name, flush=True)
sys.stdin.readline()
"""


def test_names_are_one_per_live_holder_and_a_freed_slot_is_taken_again(tmp_path) -> None:
    first, second = claim_drainer_name(tmp_path), claim_drainer_name(tmp_path)
    gateway = (tmp_path / ID_FILE).read_text().strip()
    assert (first.name, second.name) == (f"{gateway}-0", f"{gateway}-1")
    first.close()
    third = claim_drainer_name(tmp_path)
    assert third.name == f"{gateway}-0"
    second.close()
    third.close()
    third.close()  # twice is harmless


def test_a_killed_process_frees_its_name_for_its_restart(tmp_path) -> None:
    """The slot is a flock, which the kernel drops however the process ends: SIGKILL included."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        held = holder.stdout.readline().decode().strip()
        gateway = (tmp_path / ID_FILE).read_text().strip()
        assert held == f"{gateway}-0"
        beside = claim_drainer_name(tmp_path)
        assert beside.name == f"{gateway}-1"  # the live process keeps its name
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        restarted = claim_drainer_name(tmp_path)
        assert restarted.name == held
        restarted.close()
        beside.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_the_gateway_id_is_kept_and_a_damaged_one_refused(tmp_path) -> None:
    claim_drainer_name(tmp_path).close()
    made = (tmp_path / ID_FILE).read_text()
    claim_drainer_name(tmp_path / "other").close()
    assert (tmp_path / "other" / ID_FILE).read_text() != made  # another state dir, another gateway
    claim_drainer_name(tmp_path).close()
    assert (tmp_path / ID_FILE).read_text() == made
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{ID_FILE}")] == []
    (tmp_path / ID_FILE).write_text("not hex\n")
    with pytest.raises(ValueError, match="not a drainer id"):
        claim_drainer_name(tmp_path)
