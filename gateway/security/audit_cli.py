"""`bandgate audit verify` and `bandgate audit show`: check the audit chain, and read it as JSON lines.

Exit status of `verify`: 0 when the log verifies, 1 when it shows tampering (each problem on a line),
2 when it cannot be checked at all (no key, no store).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from gateway.security.audit import AuditError, load_key, verify
from gateway.security.pki import default_state_dir
from gateway.store import SqliteStore, Store, StoreError, open_store, store_for_url

DEFAULT_STORE = "sqlite:///bandgate.db"  # as `bandgate serve`
_PAGE = 1000


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `audit` (with `verify` and `show`) on the `bandgate` command's subparsers."""
    audit = sub.add_parser("audit", help="the tamper-evident audit log: verify it, or show its entries")
    asub = audit.add_subparsers(dest="audit_command", required=True)

    ver = asub.add_parser("verify", help="check every entry's MAC and the head record; exit 1 if tampered")
    _common(ver)
    ver.add_argument(
        "--state-dir", type=Path, help="where audit.key and audit.head are (default: as `bandgate pki`)"
    )
    ver.set_defaults(run=_cmd_verify)

    show = asub.add_parser("show", help="print entries as JSON lines (not verified: use verify)")
    _common(show)
    show.add_argument("--after", type=int, default=0, metavar="SEQ", help="entries after this seq")
    show.add_argument("--limit", type=int, help="at most this many entries (default: all)")
    show.set_defaults(run=_cmd_show)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"store URL (default {DEFAULT_STORE})")


def _cmd_verify(args: argparse.Namespace, console: Console) -> int:
    state = args.state_dir if args.state_dir is not None else default_state_dir()
    try:
        key = load_key(state / "audit.key")
    except AuditError as e:
        return _fail(f"audit verify: {e}")
    try:
        with _open_existing(args.store) as store:
            report = verify(store, key, state / "audit.head")
    except (StoreError, ValueError) as e:
        return _fail(f"audit verify: {e}")
    if report.ok:
        print(f"audit log verified: {report.entries} entries")
        return 0
    for problem in report.problems:
        print(problem)
    print(f"audit log NOT verified: {len(report.problems)} problem(s) in {report.entries} entries")
    return 1


def _cmd_show(args: argparse.Namespace, console: Console) -> int:
    if args.limit is not None and args.limit <= 0:
        return _fail("audit show: --limit must be > 0")
    try:
        with _open_existing(args.store) as store:
            after, left = args.after, args.limit
            while left is None or left > 0:
                page = store.audit_rows(after, _PAGE if left is None else min(_PAGE, left))
                if not page:
                    break
                for row in page:
                    sys.stdout.write(row.entry + "\n")
                after = page[-1].seq
                if left is not None:
                    left -= len(page)
    except (StoreError, ValueError) as e:
        return _fail(f"audit show: {e}")
    return 0


def _open_existing(url: str) -> Store:
    """The store at `url`, opened; refused if a SQLite file is not there (opening would create an empty
    one, which would then 'verify')."""
    store = store_for_url(url)
    if isinstance(store, SqliteStore) and not store.path.is_file():
        raise ValueError(f"no store at {store.path}")
    return open_store(url)


def _fail(message: str) -> int:
    """One line on stderr, exit status 2 (as gateway.cli's): no traceback."""
    print(message, file=sys.stderr)
    return 2
