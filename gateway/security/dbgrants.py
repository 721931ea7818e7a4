"""`bandgate admin db-grants`: the registry's consumer grants as PostgreSQL roles and privileges, a second
wall behind the gateway's own check for anyone who reaches the database directly (a reporting tool, a
leaked consumer password, an analyst's SQL client).

How a family is separated inside a table: records are kept by sensitivity class (`records_activity`
holds steps, activity, wear and distance; base.FAMILY_CLASS), so a table grant would be a class grant. Each
family gets a view instead, `<view schema>.features_<family>` = `SELECT * FROM <schema>.records_<class>
WHERE family = '<family>'`, made `security_barrier` so that no function of the reader's (a cheap one the
planner would run first) sees a row the filter drops. A consumer role gets USAGE on the view schema and
SELECT on the views of its families, and nothing on the tables: a view reads its table with its owner's
rights. The views depend on the tables' names and their `family` column only (`*` is expanded when the
view is made, so the SQL is rerun after a migration that changes columns; docs/deployment.md).

The SQL is idempotent (rerun it after every grant change): it takes an advisory lock, remakes the views
(dropping a view drops its grants, so a grant removed from the registry goes with it), creates missing
roles, grants what the registry grants and revokes the rest. It is applied with a privileged URL (a role
with CREATEROLE that can read the records tables, e.g. the database owner); the gateway's own role needs
neither.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from psycopg import sql

from gateway.privacy.keys import DEFAULT_KEY_SCHEMA
from gateway.store.base import ADMIN_FAMILY, FAMILY_CLASS, GrantRow, PrincipalRow

DEFAULT_VIEW_SCHEMA = "bandgate_features"
DEFAULT_ROLE_PREFIX = "bandgate_consumer_"
DEFAULT_STORE_SCHEMA = "bandgate"  # gateway/store/postgres.py's default `?schema=`
DATA_OPERATIONS = ("subscribe", "export")  # either reads a family's stored records
MAX_IDENTIFIER_BYTES = 63  # PostgreSQL truncates longer names silently: two consumers could share a role
_LOCK_KEY = 0x62676462  # "bgdb": one db-grants run at a time
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_]*")  # schemas and role prefixes: no quoting, no `$`

Statement = tuple[str, sql.Composable | None]  # (a comment for the printed script, the SQL or None)


class DbGrantsError(ValueError):
    """The grants cannot be expressed as roles: a name too long, a bad schema or prefix."""


@dataclass(frozen=True)
class ConsumerRole:
    """One consumer as the database sees it: its role, the families it may read, and what is left to the
    gateway (grants narrowed to some devices, which a view per family cannot express)."""

    consumer: str
    role: str
    active: bool
    families: frozenset[str]
    narrowed: frozenset[str]


def view_name(family: str) -> str:
    """The view of one family: `features_<family>`."""
    return f"features_{family}"


def consumer_roles(
    principals: Iterable[PrincipalRow], grants: Iterable[GrantRow], *, role_prefix: str = DEFAULT_ROLE_PREFIX
) -> list[ConsumerRole]:
    """Each registered consumer's role and readable families, sorted by consumer. A family is readable in
    the database only when the consumer may read it for every device: a grant narrowed to devices stays
    the gateway's to enforce (`narrowed`), never widened here. A revoked consumer reads nothing."""
    _check_plain("role prefix", role_prefix)
    consumers = {p.name: p.state == "active" for p in principals if p.kind == "consumer"}
    families: dict[str, set[str]] = {name: set() for name in consumers}
    narrowed: dict[str, set[str]] = {name: set() for name in consumers}
    for g in grants:
        if g.consumer not in consumers or g.family == ADMIN_FAMILY or g.operation not in DATA_OPERATIONS:
            continue
        (narrowed if g.devices else families)[g.consumer].add(g.family)
    roles = []
    for name in sorted(consumers):
        role = role_prefix + name
        if len(role.encode()) > MAX_IDENTIFIER_BYTES:
            raise DbGrantsError(
                f"consumer {name!r}: role {role!r} is longer than {MAX_IDENTIFIER_BYTES} bytes; "
                "choose a shorter --role-prefix"
            )
        readable = frozenset(families[name]) if consumers[name] else frozenset()
        roles.append(
            ConsumerRole(name, role, consumers[name], readable, frozenset(narrowed[name] - readable))
        )
    return roles


def grant_statements(
    roles: Iterable[ConsumerRole],
    *,
    store_schema: str = DEFAULT_STORE_SCHEMA,
    view_schema: str = DEFAULT_VIEW_SCHEMA,
    key_schema: str = DEFAULT_KEY_SCHEMA,
    login: bool = False,
    family_class: Mapping[str, str] = FAMILY_CLASS,
) -> list[Statement]:
    """The SQL, in order, as (comment, psycopg `sql.Composable`) pairs: one transaction's worth, every
    identifier quoted by psycopg. `login`: new roles may log in (else NOLOGIN, for the operator to enable
    with the authentication of their choice); an existing role's LOGIN is left as it is, except that a
    revoked consumer's role is made NOLOGIN."""
    for what, name in (
        ("store schema", store_schema),
        ("view schema", view_schema),
        ("key schema", key_schema),
    ):
        _check_plain(what, name)
    if view_schema in (store_schema, key_schema):
        raise DbGrantsError("the view schema must be a schema of its own, not the store's or the keys'")
    roles = list(roles)
    views = sorted(family_class)
    view = {f: sql.Identifier(view_schema, view_name(f)) for f in views}
    vschema = sql.Identifier(view_schema)
    out: list[Statement] = [
        (
            "one run at a time; fail rather than queue behind a long reader",
            sql.SQL("SET LOCAL lock_timeout = '10s'"),
        ),
        ("", sql.SQL("SELECT pg_advisory_xact_lock({})").format(sql.Literal(_LOCK_KEY))),
        (
            "the family views live apart from the store's tables",
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(vschema),
        ),
        ("", sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(vschema)),
    ]
    for family in views:
        table = sql.Identifier(store_schema, f"records_{family_class[family]}")
        out += [
            (
                f"{family}: rows of {family} only, filtered before any function of the reader's runs",
                sql.SQL("DROP VIEW IF EXISTS {}").format(view[family]),
            ),
            (
                "",
                sql.SQL(
                    "CREATE VIEW {} WITH (security_barrier = true) AS SELECT * FROM {} WHERE family = {}"
                ).format(view[family], table, sql.Literal(family)),
            ),
            ("", sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(view[family])),
        ]
    for r in roles:
        role = sql.Identifier(r.role)
        create = sql.SQL("CREATE ROLE {} {}").format(
            role, sql.SQL("LOGIN" if login and r.active else "NOLOGIN")
        )
        # no CREATE ROLE IF NOT EXISTS in PostgreSQL: a block that ignores an existing role
        body = sql.SQL("BEGIN {}; EXCEPTION WHEN duplicate_object THEN NULL; END").format(create)
        state = "revoked: reads nothing" if not r.active else (", ".join(sorted(r.families)) or "no family")
        out.append((f"consumer {r.consumer}: {state}", sql.SQL("DO $bandgate$ {} $bandgate$").format(body)))
        if not r.active:
            out.append(("", sql.SQL("ALTER ROLE {} NOLOGIN").format(role)))
        for family in sorted(r.narrowed):
            out.append(
                (f"{r.consumer}: {family} is granted for some devices only: left to the gateway", None)
            )
        if r.families:
            out.append(("", sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(vschema, role)))
        else:
            out.append(("", sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(vschema, role)))
        for family in views:
            if family in r.families:
                out.append(("", sql.SQL("GRANT SELECT ON {} TO {}").format(view[family], role)))
            else:
                out.append(("", sql.SQL("REVOKE ALL ON {} FROM {}").format(view[family], role)))
        # nothing directly on the store's or the key store's tables, whatever was granted by hand before
        for schema in (store_schema, key_schema):
            out.append(("", _revoke_schema(schema, r.role)))
    return out


def _revoke_schema(schema: str, role: str) -> sql.Composable:
    """REVOKE ALL on a schema and its tables, if the schema exists (the key schema does only once a
    gateway has started on this database)."""
    revoke = sql.SQL(
        "EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM %I', {schema}, {role}); "
        "EXECUTE format('REVOKE ALL ON SCHEMA %I FROM %I', {schema}, {role});"
    ).format(schema=sql.Literal(schema), role=sql.Literal(role))
    return sql.SQL(
        "DO $bandgate$ BEGIN IF to_regnamespace({}) IS NOT NULL THEN {} END IF; END $bandgate$"
    ).format(sql.Literal(schema), revoke)


def render(statements: Iterable[Statement]) -> str:
    """The statements as a psql script in one transaction: comments, then each statement and `;`."""
    lines = [
        "-- bandgate admin db-grants: idempotent; run as a role with CREATEROLE that can read the tables",
        "BEGIN;",
    ]
    for comment, statement in statements:
        if comment:
            lines.append(f"-- {comment}")
        if statement is not None:
            lines.append(statement.as_string() + ";")
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def apply(url: str, statements: Iterable[Statement]) -> int:
    """Run the statements in one transaction at `url` (a privileged role); returns how many ran."""
    import psycopg

    from gateway.privacy.keys_postgres import libpq_url

    count = 0
    with psycopg.connect(libpq_url(url)) as conn, conn.transaction():
        for _comment, statement in statements:
            if statement is not None:
                conn.execute(statement)
                count += 1
    return count


def _check_plain(what: str, name: str) -> None:
    if not (_PLAIN_NAME.fullmatch(name) and len(name.encode()) <= MAX_IDENTIFIER_BYTES):
        raise DbGrantsError(f"{what} {name!r}: want 1-63 of [a-z0-9_], not starting with a digit")


# the command


def add_parser(asub: argparse._SubParsersAction) -> None:
    """Register `bandgate admin db-grants`."""
    p = asub.add_parser(
        "db-grants",
        help="PostgreSQL roles and per-family views from the registry's grants (print, or --apply)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument(
        "--store", default="sqlite:///bandgate.db", help="the store whose registry holds the grants"
    )
    p.add_argument(
        "--schema",
        help=f"the records tables' schema (default: the --store URL's ?schema=, else {DEFAULT_STORE_SCHEMA})",
    )
    p.add_argument("--view-schema", default=DEFAULT_VIEW_SCHEMA, help=f"default {DEFAULT_VIEW_SCHEMA}")
    p.add_argument(
        "--key-schema",
        default=DEFAULT_KEY_SCHEMA,
        help=f"revoked from every role (default {DEFAULT_KEY_SCHEMA})",
    )
    p.add_argument(
        "--role-prefix",
        default=DEFAULT_ROLE_PREFIX,
        help=f"role = prefix + consumer (default {DEFAULT_ROLE_PREFIX})",
    )
    p.add_argument("--login", action="store_true", help="create new roles with LOGIN (default NOLOGIN)")
    p.add_argument("--apply", action="store_true", help="run the SQL at --url instead of only printing it")
    p.add_argument("--url", help="with --apply: postgresql:// URL of a privileged role (CREATEROLE)")
    p.set_defaults(run=_run)


def _store_schema(args: argparse.Namespace) -> str:
    if args.schema:
        return args.schema
    from urllib.parse import parse_qsl, urlsplit

    from gateway.privacy.keys import is_postgres_url

    if is_postgres_url(args.store):
        for key, value in parse_qsl(urlsplit(args.store).query):
            if key == "schema":
                return value
    return DEFAULT_STORE_SCHEMA


def _run(args: argparse.Namespace, console: object) -> int:
    from gateway.store import SqliteStore, StoreError, open_store, store_for_url

    if args.apply != bool(args.url):
        print("admin db-grants: --apply and --url go together", file=sys.stderr)
        return 2
    try:
        store = store_for_url(args.store)
        if isinstance(store, SqliteStore) and not store.path.is_file():
            raise ValueError(f"no store at {store.path}")  # opening would create an empty one
        with open_store(args.store) as store:
            snapshot = store.registry_snapshot()
        roles = consumer_roles(snapshot.principals, snapshot.grants, role_prefix=args.role_prefix)
        statements = grant_statements(
            roles,
            store_schema=_store_schema(args),
            view_schema=args.view_schema,
            key_schema=args.key_schema,
            login=args.login,
        )
    except (DbGrantsError, StoreError, ValueError, OSError) as e:
        print(f"admin db-grants: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(render(statements))
    if args.apply:
        import psycopg

        try:
            count = apply(args.url, statements)
        except psycopg.Error as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"admin db-grants: not applied (rolled back): {type(e).__name__}: {first}", file=sys.stderr)
            return 2
        print(f"admin db-grants: applied {count} statements for {len(roles)} consumer roles", file=sys.stderr)
    return 0


__all__ = [
    "DEFAULT_ROLE_PREFIX",
    "DEFAULT_VIEW_SCHEMA",
    "ConsumerRole",
    "DbGrantsError",
    "Statement",
    "add_parser",
    "apply",
    "consumer_roles",
    "grant_statements",
    "render",
    "view_name",
]
