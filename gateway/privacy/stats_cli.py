"""`bandgate stats`: release anonymised statistics (gateway/privacy/stats.py) as JSON lines.

Every release is charged to the budget in the state dir (`stats.budget.json`) and recorded in the audit
log (`audit.key` there too): without an audit key nothing is released. Exit status 0 after a release,
2 when refused (budget spent, no audit key, a bad cohorts file or store): one line on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

from rich.console import Console

from gateway.privacy.crypto import CryptoError
from gateway.privacy.keys import DEFAULT_KEY_SCHEMA, KeyStoreError
from gateway.privacy.profile import Profile, ProfileError, unseal
from gateway.privacy.sealing import KeySealer, has_key_store, open_sealer
from gateway.privacy.stats import (
    DEFAULT_DELTA,
    Budget,
    ReleaseSummary,
    StatsConfig,
    StatsError,
    audit_recorder,
    cohorts_from_profiles,
    collect,
    release,
)
from gateway.security.audit import AuditError, AuditLog, load_key
from gateway.security.pki import default_state_dir
from gateway.store import SqliteStore, StoreError, open_store, store_for_url
from gateway.store.base import SealedRow, Store

DEFAULT_STORE = "sqlite:///bandgate.db"  # as `bandgate serve`


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `stats` on the `bandgate` command's subparsers."""
    p = sub.add_parser(
        "stats",
        help="differentially private daily steps, sleep time and resting HR by age group and country",
    )
    p.add_argument("--store", default=DEFAULT_STORE, help=f"store URL (default {DEFAULT_STORE})")
    p.add_argument(
        "--epsilon", type=_positive, required=True, help="ε this release spends (split over metrics)"
    )
    p.add_argument(
        "--delta", type=_positive, default=DEFAULT_DELTA, help=f"δ it spends (default {DEFAULT_DELTA})"
    )
    p.add_argument("--state-dir", type=Path, help="budget and audit key (default: as `bandgate serve`)")
    p.add_argument(
        "--key-schema",
        default=DEFAULT_KEY_SCHEMA,
        help=f"a PostgreSQL store's key schema, as the gateway's key_schema (default {DEFAULT_KEY_SCHEMA})",
    )
    p.add_argument(
        "--cohorts",
        type=Path,
        help='JSON {"<16 hex device>": ["25-34", "DE"], ...} (default: from the owners\' profiles)',
    )
    p.add_argument("--max-days", type=int, default=28, help="days per person averaged (most recent)")
    p.add_argument(
        "--total-epsilon", type=_positive, help="lifetime ε when the budget is created (default 10)"
    )
    p.add_argument(
        "--total-delta", type=_positive, help="lifetime δ when the budget is created (default 1e-5)"
    )
    p.set_defaults(run=_cmd_stats)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _cmd_stats(args: argparse.Namespace, console: Console) -> int:
    state = args.state_dir if args.state_dir is not None else default_state_dir()
    sealer = None
    try:
        config = StatsConfig(max_days=args.max_days, delta=args.delta)
        key = load_key(state / "audit.key")
        budget = Budget.in_state_dir(state, total_epsilon=args.total_epsilon, total_delta=args.total_delta)
        store = store_for_url(args.store)
        if isinstance(store, SqliteStore) and not store.path.is_file():
            raise ValueError(f"no store at {store.path}")  # opening would create an empty one
        if has_key_store(state, args.store):  # the gateway's keys: its records and profiles are sealed
            sealer = open_sealer(state, args.store, key_schema=args.key_schema)
        with open_store(args.store, sealer) as store:
            if args.cohorts is not None:
                cohorts = _read_cohorts(args.cohorts)
            else:
                cohorts = _profile_cohorts(store, sealer)
            log = AuditLog(store, key, state / "audit.head")
            log.open()
            audit = audit_recorder(log)
            summaries: list[ReleaseSummary] = []

            def record(summary: ReleaseSummary) -> None:
                audit(summary)
                summaries.append(summary)

            stats = release(collect(store, cohorts, config), args.epsilon, budget, record)
    except (StatsError, AuditError, StoreError, ValueError, OSError) as e:
        return _fail(f"stats: {e}")
    finally:
        if sealer is not None:
            sealer.keys.close()
    for stat in stats:
        sys.stdout.write(json.dumps(stat.to_json(), separators=(",", ":")) + "\n")
    (done,) = summaries
    left = done.remaining
    print(
        # not how many were suppressed: that count is exact, not private, and kept to the audit log
        f"released {len(stats)} cohort statistics at ε={done.epsilon:.6g}, δ={done.delta:.3g}; "
        f"budget left ε={max(left.epsilon, 0):.6g}, δ={max(left.delta, 0):.3g}",
        file=sys.stderr,
    )
    return 0


def _profile_cohorts(store: Store, sealer: KeySealer | None) -> dict[str, tuple[str, str]]:
    """Cohorts from the owners' current profiles, unsealed with the gateway's keys."""
    if sealer is None:
        raise ValueError("no key store in the state dir to open the profiles with; give --cohorts")

    def open_profile(row: SealedRow) -> Profile | None:
        try:
            return unseal(
                sealer.keys.data_key(row.device, row.ownership, create=False), row.sealed, row.version
            )
        except (CryptoError, KeyStoreError, ProfileError):
            return None

    return cohorts_from_profiles(store.registry_snapshot().profiles, open_profile, datetime.date.today().year)


def _read_cohorts(path: Path) -> dict[str, tuple[str, str]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"cohorts file {path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) and len(v) == 2 for v in data.values()):
        raise ValueError(f'cohorts file {path}: expected {{"<device>": ["<age group>", "<country>"]}}')
    return {device: (v[0], v[1]) for device, v in data.items()}


def _fail(message: str) -> int:
    """One line on stderr, exit status 2 (as gateway.cli's): no traceback."""
    print(message, file=sys.stderr)
    return 2
