"""`bandgate stats`: release anonymised statistics (gateway/privacy/stats.py) as JSON lines.

Every release is charged to the budget in the state dir (`stats.budget.json`) and recorded in the audit
log (`audit.key` there too): without an audit key nothing is released. Exit status 0 after a release,
2 when refused (budget spent, no audit key, a bad cohorts file or store): one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from rich.console import Console

from gateway.privacy.stats import (
    DEFAULT_DELTA,
    Budget,
    ReleaseSummary,
    StatsConfig,
    StatsError,
    audit_recorder,
    collect,
    release,
)
from gateway.security.audit import AuditError, AuditLog, load_key
from gateway.security.pki import default_state_dir
from gateway.store import SqliteStore, StoreError, open_store, store_for_url

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
        "--cohorts",
        type=Path,
        required=True,
        help='JSON {"<16 hex device>": ["25-34", "DE"], ...}: each device\'s age group and country',
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
    try:
        cohorts = _read_cohorts(args.cohorts)
        config = StatsConfig(max_days=args.max_days, delta=args.delta)
        key = load_key(state / "audit.key")
        budget = Budget.in_state_dir(state, total_epsilon=args.total_epsilon, total_delta=args.total_delta)
        store = store_for_url(args.store)
        if isinstance(store, SqliteStore) and not store.path.is_file():
            raise ValueError(f"no store at {store.path}")  # opening would create an empty one
        with open_store(args.store) as store:
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
