"""Generate the Python code for protos/bandgate/v1/*.proto, next to the .proto files.

The generated modules are committed and never edited by hand; a test regenerates them into a
temporary folder and compares, so a changed .proto without regenerated code fails the test suite.
Usage: python protos/generate.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    """Run grpc_tools.protoc on every .proto under protos/; returns the files written."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted(PROTO_ROOT.glob("bandgate/**/*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted(p for p in out_dir.glob("bandgate/**/*") if "_pb2" in p.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
