"""Generated protobuf code is produced by protos/generate.py only: regenerating gives the same files."""

from __future__ import annotations

from pathlib import Path

import pytest

PROTOS = Path(__file__).resolve().parents[1] / "protos"


def test_generated_code_is_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    from protos.generate import generate

    fresh = generate(tmp_path)
    assert fresh, "nothing generated"
    for path in fresh:
        committed = PROTOS / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed"
        assert committed.read_text() == path.read_text(), f"{committed.name} differs: regenerate"
    generated = {p.relative_to(PROTOS) for p in PROTOS.glob("bandgate/**/*") if "_pb2" in p.name}
    assert generated == {p.relative_to(tmp_path) for p in fresh}, "stale generated files"
