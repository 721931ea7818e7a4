"""`bandgate audit verify`, `show` and `drop-before`: check the audit chain, read it as JSON lines (all of
it, or the entries naming one device, found by its pseudonym), and drop whole old segments.

Exit status of `verify`: 0 when the log verifies, 1 when it shows tampering (each problem on a line),
2 when it cannot be checked at all (no key, no store). `drop-before` records a sealed "audit.dropped"
entry, then deletes the closed segments ending at or before SEQ (or older than --days); run
`verify` after it: the rest verifies from the checkpoint of the first segment kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console

from gateway.privacy.crypto import normalize_device
from gateway.privacy.keys import TOMBSTONE_FILE, KekError, load_tombstone_key
from gateway.security.audit import AuditError, AuditLog, audit_pseudonym, load_key, verify
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
    show.add_argument(
        "--device", metavar="ID", help="only entries naming this device (16 hex), found by its pseudonym"
    )
    show.add_argument("--state-dir", type=Path, help="where tombstone.key is, for --device")
    show.set_defaults(run=_cmd_show)

    drop = asub.add_parser(
        "drop-before", help="drop the closed segments ending at or before SEQ, or older than --days"
    )
    _common(drop)
    when = drop.add_mutually_exclusive_group(required=True)
    when.add_argument("seq", type=int, nargs="?", metavar="SEQ", help="the last entry that may go")
    when.add_argument("--days", type=float, help="segments whose last entry is older than this")
    drop.add_argument("--state-dir", type=Path, help="where audit.key and audit.head are")
    drop.add_argument("--actor", default="consumer:operator", help="who drops (the audit entry names it)")
    drop.set_defaults(run=_cmd_drop)

    restored = asub.add_parser(
        "accept-restore",
        help="after restoring the store from a backup: accept its shorter log (the gap is recorded)",
    )
    _common(restored)
    restored.add_argument("--state-dir", type=Path, help="where audit.key and audit.head are")
    restored.add_argument("--actor", default="consumer:operator", help="who restored (the entry names it)")
    restored.set_defaults(run=_cmd_accept_restore)


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
        dropped = f" (1..{report.dropped} dropped by segment)" if report.dropped else ""
        print(f"audit log verified: {report.entries} entries{dropped}")
        return 0
    for problem in report.problems:
        print(problem)
    print(f"audit log NOT verified: {len(report.problems)} problem(s) in {report.entries} entries")
    return 1


def _cmd_show(args: argparse.Namespace, console: Console) -> int:
    if args.limit is not None and args.limit <= 0:
        return _fail("audit show: --limit must be > 0")
    try:
        naming: tuple[str, ...] = ()
        if args.device is not None:
            state = args.state_dir if args.state_dir is not None else default_state_dir()
            key = load_tombstone_key(state / TOMBSTONE_FILE, create=False)
            # its pseudonym; or, in entries from before pseudonyms, its ID as actor or subject
            naming = (audit_pseudonym(key, args.device), f'"device:{normalize_device(args.device)}"')
        with _open_existing(args.store) as store:
            after, left = args.after, args.limit
            while left is None or left > 0:
                page = store.audit_rows(after, _PAGE)
                if not page:
                    break
                for row in page:
                    after = row.seq
                    if not naming or any(n in row.entry for n in naming):
                        sys.stdout.write(row.entry + "\n")
                        if left is not None:
                            left -= 1
                            if left == 0:
                                break
    except (StoreError, ValueError, KekError) as e:
        return _fail(f"audit show: {e}")
    return 0


def _cmd_drop(args: argparse.Namespace, console: Console) -> int:
    if args.days is not None and not args.days >= 0:
        return _fail("audit drop-before: --days must be >= 0")
    state = args.state_dir if args.state_dir is not None else default_state_dir()
    try:
        key = load_key(state / "audit.key")
        with _open_existing(args.store) as store:
            log = AuditLog(store, key, state / "audit.head")
            log.open()
            if args.days is not None:
                dropped = log.drop_older_than(time.time_ns() // 1000 - int(args.days * 86_400e6), args.actor)
            else:
                dropped = log.drop_through(args.seq, args.actor)
            first = store.audit_rows(0, 1)
    except (AuditError, StoreError, ValueError) as e:
        return _fail(f"audit drop-before: {e}")
    if not dropped:
        print("nothing dropped: no closed segment ends there")
    else:
        print(f"dropped {dropped} entries; the log now starts at {first[0].seq}")
    return 0


def _cmd_accept_restore(args: argparse.Namespace, console: Console) -> int:
    state = args.state_dir if args.state_dir is not None else default_state_dir()
    try:
        key = load_key(state / "audit.key")
        with _open_existing(args.store) as store:
            restored, was = AuditLog(store, key, state / "audit.head").accept_restore(args.actor)
    except (AuditError, StoreError, ValueError) as e:
        return _fail(f"audit accept-restore: {e}")
    print(
        f"restore accepted: the log resumes after entry {restored}; entries {restored + 1}..{was} "
        "are gone with the restore (recorded as audit.restored); the next start re-applies the "
        "erasures and withdrawals made since (the erasure journal)"
    )
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
