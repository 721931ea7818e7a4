"""`bandgate admin db-grants` (gateway/security/dbgrants.py): the SQL it writes, checked as text, then
applied to a real PostgreSQL and attacked from the consumer's role: a family it was not granted cannot be
read (not through its view, not through the table, not through another family's view with a leaky
function), and neither can the key store. Roles are cluster-wide, so each test has names of its own and
drops them after; the records tables are minimal stand-ins with the store's names and a `family` column,
which is all the views depend on."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql

from decoder.records import FAMILIES
from gateway.security.dbgrants import (
    DbGrantsError,
    apply,
    consumer_roles,
    grant_statements,
    render,
    view_name,
)
from gateway.store import open_store
from gateway.store.base import FAMILY_CLASS, GrantRow, PrincipalRow, RegistryOp
from tests.services import postgres_url, unique_name

CLI = (sys.executable, "-m", "gateway.cli")
DEVICE = "00000000000000a1"


def consumer(name: str, state: str = "active") -> PrincipalRow:
    return PrincipalRow("consumer", name, state, 0, 0)


# the SQL, as text


def test_roles_follow_the_registry() -> None:
    principals = [
        consumer("dash"),
        consumer("gone", "revoked"),
        consumer("nothing"),
        PrincipalRow("device", DEVICE, "active", 0, 0),
        PrincipalRow("relay", "phone-1", "active", 0, 0),
    ]
    grants = [
        GrantRow("dash", "steps", "subscribe"),
        GrantRow("dash", "sleep", "export"),
        GrantRow("dash", "heart", "subscribe", (DEVICE,)),  # narrowed to one device: not in the database
        GrantRow("dash", "*", "admin"),  # carries no data
        GrantRow("gone", "steps", "subscribe"),  # revoked: reads nothing
        GrantRow("unknown", "steps", "subscribe"),  # no such consumer registered
    ]
    roles = {r.consumer: r for r in consumer_roles(principals, grants, role_prefix="bg_")}
    assert sorted(roles) == ["dash", "gone", "nothing"]
    assert roles["dash"].role == "bg_dash"
    assert roles["dash"].families == {"steps", "sleep"} and roles["dash"].narrowed == {"heart"}
    assert roles["gone"].families == frozenset() and not roles["gone"].active
    assert roles["nothing"].families == frozenset()


def test_the_script_grants_exactly_the_granted_views_and_quotes_every_name() -> None:
    roles = consumer_roles(
        [consumer("dash-board.v2"), consumer("gone", "revoked")],
        [GrantRow("dash-board.v2", "steps", "subscribe"), GrantRow("gone", "steps", "subscribe")],
    )
    script = render(grant_statements(roles, store_schema="fleet", view_schema="fleet_views"))
    assert script.startswith("-- bandgate admin db-grants") and "\nBEGIN;\n" in script
    assert script.endswith("COMMIT;\n")
    role = '"bandgate_consumer_dash-board.v2"'  # a consumer name needs quoting: "." and "-"
    for family in FAMILIES:
        view = f'"fleet_views"."features_{family}"'
        table = f'"fleet"."records_{FAMILY_CLASS[family]}"'
        assert (
            f"CREATE VIEW {view} WITH (security_barrier = true) AS SELECT * FROM {table} "
            f"WHERE family = '{family}';" in script
        )
        granted = f"GRANT SELECT ON {view} TO {role};"
        revoked = f"REVOKE ALL ON {view} FROM {role};"
        assert (granted in script, revoked in script) == (
            (True, False) if family == "steps" else (False, True)
        )
        assert f'GRANT SELECT ON {view} TO "bandgate_consumer_gone"' not in script
        assert f"REVOKE ALL ON {view} FROM PUBLIC;" in script
    assert 'ALTER ROLE "bandgate_consumer_gone" NOLOGIN;' in script
    assert f"CREATE ROLE {role} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL;" in script
    assert "'bandgate_keys'" in script and "'fleet'" in script  # both revoked from every role
    with_login = render(grant_statements(roles, login=True))
    assert f"CREATE ROLE {role} LOGIN;" in with_login
    assert 'CREATE ROLE "bandgate_consumer_gone" NOLOGIN;' in with_login


def test_names_that_cannot_be_roles_are_refused() -> None:
    with pytest.raises(DbGrantsError, match="longer than 63 bytes"):
        consumer_roles([consumer("c" * 50)], [], role_prefix="bandgate_consumer_")
    assert consumer_roles([consumer("c" * 50)], [], role_prefix="bg_")[0].role == "bg_" + "c" * 50
    for prefix in ("Bad", "a$b", "x'; DROP ROLE postgres; --", "1x"):
        with pytest.raises(DbGrantsError, match="role prefix"):
            consumer_roles([], [], role_prefix=prefix)
    with pytest.raises(DbGrantsError, match="view schema"):
        grant_statements([], view_schema='views"; DROP')
    with pytest.raises(DbGrantsError, match="schema of its own"):
        grant_statements([], store_schema="bandgate", view_schema="bandgate")


# applied, and attacked


@dataclass
class Database:
    """A fresh store schema with stand-in records tables (a row of every family), a view schema and a
    key schema, and a role prefix of its own; all dropped after."""

    url: str
    admin: psycopg.Connection
    store_schema: str
    view_schema: str
    key_schema: str
    prefix: str

    def statements(self, principals: list[PrincipalRow], grants: list[GrantRow], **kwargs):
        roles = consumer_roles(principals, grants, role_prefix=self.prefix)
        return grant_statements(
            roles,
            store_schema=self.store_schema,
            view_schema=self.view_schema,
            key_schema=self.key_schema,
            **kwargs,
        )

    def read_as(self, role: str, query: sql.Composable) -> list[tuple]:
        """`query` run as `role` (SET ROLE from the superuser: the role's privileges exactly)."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            return conn.execute(query).fetchall()

    def view(self, family: str) -> sql.Composable:
        return sql.SQL("SELECT family, device FROM {}").format(
            sql.Identifier(self.view_schema, view_name(family))
        )


@pytest.fixture
def database() -> Iterator[Database]:
    url = postgres_url()
    admin = psycopg.connect(url, autocommit=True)
    db = Database(
        url,
        admin,
        unique_name("test_store"),
        unique_name("test_views"),
        unique_name("test_keys"),
        unique_name("tg") + "_",
    )
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(db.store_schema)))
    for cls in sorted(set(FAMILY_CLASS.values())):
        table = sql.Identifier(db.store_schema, f"records_{cls}")
        admin.execute(
            sql.SQL(
                "CREATE TABLE {} (cursor bigint PRIMARY KEY, device text NOT NULL, ownership text NOT NULL, "
                "family text NOT NULL, start_us bigint NOT NULL, duration_s integer NOT NULL, "
                "algo text NOT NULL, value_sealed bytea)"
            ).format(table)
        )
    for i, family in enumerate(sorted(FAMILIES)):
        table = sql.Identifier(db.store_schema, f"records_{FAMILY_CLASS[family]}")
        admin.execute(
            sql.SQL("INSERT INTO {} VALUES (%s, %s, 'o', %s, 0, 60, 'v1', %s)").format(table),
            (i + 1, DEVICE, family, b"sealed"),
        )
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(db.key_schema)))
    admin.execute(
        sql.SQL("CREATE TABLE {} (wrapped bytea)").format(sql.Identifier(db.key_schema, "data_keys"))
    )
    try:
        yield db
    finally:
        for schema in (db.view_schema, db.store_schema, db.key_schema):
            admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        roles = admin.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", (db.prefix,))
        for (role,) in roles.fetchall():
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        admin.close()


def test_a_consumer_granted_steps_reads_steps_and_nothing_else(database: Database) -> None:
    db = database
    principals = [consumer("dash")]
    grants = [GrantRow("dash", "steps", "subscribe")]
    role = db.prefix + "dash"
    assert apply(db.url, db.statements(principals, grants)) > 0

    assert db.read_as(role, db.view("steps")) == [("steps", DEVICE)]  # only steps of records_activity
    for family in sorted(set(FAMILIES) - {"steps"}):
        with pytest.raises(errors.InsufficientPrivilege):
            db.read_as(role, db.view(family))
    for cls in sorted(set(FAMILY_CLASS.values())):  # not the tables: records_activity holds other families
        with pytest.raises(errors.InsufficientPrivilege):
            db.read_as(
                role, sql.SQL("SELECT * FROM {}").format(sql.Identifier(db.store_schema, f"records_{cls}"))
            )
    with pytest.raises(errors.InsufficientPrivilege):
        db.read_as(role, sql.SQL("SELECT * FROM {}").format(sql.Identifier(db.key_schema, "data_keys")))


def test_a_leaky_function_sees_only_the_granted_familys_rows(database: Database) -> None:
    """The attack security_barrier stops: a cheap function of the reader's in the WHERE clause, which the
    planner would otherwise run before the view's own filter, reporting every row it is shown."""
    db = database
    role = db.prefix + "dash"
    apply(db.url, db.statements([consumer("dash")], [GrantRow("dash", "steps", "subscribe")]))
    seen: list[str] = []
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: seen.append(diag.message_primary or ""))
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        conn.execute(
            "CREATE FUNCTION pg_temp.leak(family text) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 AS "
            "$$ BEGIN RAISE NOTICE 'saw %', family; RETURN true; END $$"
        )
        rows = conn.execute(
            sql.SQL("SELECT family FROM {} WHERE pg_temp.leak(family)").format(
                sql.Identifier(db.view_schema, view_name("steps"))
            )
        ).fetchall()
    assert rows == [("steps",)]
    assert seen == ["saw steps"]  # never activity, wear or distance, which share the table


def test_reapplying_converges_on_the_registry(database: Database) -> None:
    """Idempotent, and a grant taken away in the registry is taken away in the database; a revoked consumer
    can no longer log in."""
    db = database
    role = db.prefix + "dash"
    both = [GrantRow("dash", "steps", "subscribe"), GrantRow("dash", "heart", "export")]
    apply(db.url, db.statements([consumer("dash")], both, login=True))
    apply(db.url, db.statements([consumer("dash")], both, login=True))  # twice: no error, same result
    assert db.read_as(role, db.view("heart")) == [("heart", DEVICE)]
    with psycopg.connect(db.url.replace("postgres@", f"{role}@")) as conn:  # a real login as the consumer
        assert conn.execute(db.view("steps")).fetchall() == [("steps", DEVICE)]
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(db.view("sleep"))

    apply(db.url, db.statements([consumer("dash")], both[:1]))
    with pytest.raises(errors.InsufficientPrivilege):
        db.read_as(role, db.view("heart"))
    assert db.read_as(role, db.view("steps")) == [("steps", DEVICE)]

    apply(db.url, db.statements([consumer("dash", "revoked")], both[:1]))
    with pytest.raises(errors.InsufficientPrivilege):
        db.read_as(role, db.view("steps"))
    (can_login,) = db.admin.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    assert can_login is False


def test_a_failed_apply_changes_nothing(database: Database) -> None:
    db = database
    db.admin.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(db.store_schema, "records_sleep")))
    with pytest.raises(psycopg.errors.UndefinedTable):
        apply(db.url, db.statements([consumer("dash")], [GrantRow("dash", "steps", "subscribe")]))
    roles = db.admin.execute("SELECT count(*) FROM pg_roles WHERE starts_with(rolname, %s)", (db.prefix,))
    assert roles.fetchone() == (0,)
    assert db.admin.execute("SELECT to_regnamespace(%s)", (db.view_schema,)).fetchone() == (None,)


def test_the_command_prints_and_applies_the_registrys_grants(database: Database, tmp_path: Path) -> None:
    db = database
    store_url = f"sqlite:///{tmp_path / 'bandgate.db'}"
    with open_store(store_url) as store:
        store.registry_apply(
            [
                RegistryOp("principal", kind="consumer", name="dash"),
                RegistryOp("grant", grant=GrantRow("dash", "steps", "subscribe")),
            ]
        )
    common = [
        *CLI,
        "admin",
        "db-grants",
        "--store",
        store_url,
        "--schema",
        db.store_schema,
        "--view-schema",
        db.view_schema,
        "--key-schema",
        db.key_schema,
        "--role-prefix",
        db.prefix,
    ]
    printed = subprocess.run(common, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    role = f'"{db.prefix}dash"'
    assert f'GRANT SELECT ON "{db.view_schema}"."features_steps" TO {role};' in printed.stdout
    assert db.admin.execute("SELECT to_regnamespace(%s)", (db.view_schema,)).fetchone() == (
        None,
    )  # printed only

    refused = subprocess.run([*common, "--apply"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--apply and --url go together" in refused.stderr

    applied = subprocess.run(
        [*common, "--apply", "--url", db.url], capture_output=True, text=True, timeout=60
    )
    assert applied.returncode == 0, applied.stderr
    assert "applied" in applied.stderr and applied.stdout == printed.stdout
    assert db.read_as(db.prefix + "dash", db.view("steps")) == [("steps", DEVICE)]
    with pytest.raises(errors.InsufficientPrivilege):
        db.read_as(db.prefix + "dash", db.view("heart"))

    missing = subprocess.run(
        [*CLI, "admin", "db-grants", "--store", f"sqlite:///{tmp_path / 'absent.db'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "no store at" in missing.stderr
    assert not (tmp_path / "absent.db").exists()
