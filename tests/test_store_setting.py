"""``settings.store`` and ``store_password``: where the dispatcher keeps its state, checked at
the edge (a password never in the URL, never echoed), and a dispatcher really opening it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from narwhal.config.loader import load_config
from narwhal.config.settings import parse_store
from narwhal.dispatch.backend import StoreUnavailable
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.dispatch.store import Store, StoreInUse
from narwhal.errors import ConfigError

PIPELINE = 'repo: "*"\nimage: narwhal-test/busybox:latest\nsteps:\n  - {name: build, run: "true"}\n'


def config_dir(tmp_path: Path, settings: str, secrets: str = "") -> Path:
    root = tmp_path / "config"
    (root / "pipelines").mkdir(parents=True, exist_ok=True)
    (root / "pipelines" / "ci.yaml").write_text(PIPELINE)
    (root / "inventory.yaml").write_text(
        "runners:\n  - {name: local, transport: local}\n" + secrets + "settings:\n" + settings)
    return root


@pytest.mark.parametrize("value", ["postgresql://narwhal@db.example.com:5432/narwhal",
                                   "postgres://db/narwhal", "postgresql://narwhal@[::1]/nw?sslmode=verify-full"])
def test_postgresql_urls_are_taken_as_written(value):
    assert parse_store(value) == value


@pytest.mark.parametrize("value", [None, "none", "sqlite"])
def test_none_is_sqlite_in_the_state_directory(value):
    assert parse_store(value) is None


@pytest.mark.parametrize("value", [
    "mysql://db/narwhal", "postgresql://db", "postgresql://db/", "postgresql:///narwhal", "postgresql://db/a b",
    "postgresql://db:99999/narwhal", "postgresql://db/narwhal#x", "postgresql://db/n\nx", 42, ["postgresql://db/n"],
    "postgresql://db/narwhal?options=-c%20x", "/var/lib/narwhal/narwhal.db", "postgresql://db/" + "n" * 64,
])
def test_other_stores_are_refused_with_what_is_expected(value):
    with pytest.raises(ValueError, match="expected none"):
        parse_store(value)


@pytest.mark.parametrize("value", ["postgresql://narwhal:hunter2-secret@db/narwhal",
                                   "postgresql://narwhal:hunter2-secret@db:bad/narwhal",
                                   "postgresql://narwhal@db/narwhal?sslmode=require&password=hunter2-secret",
                                   "postgresql://db/narwhal?sslpassword=hunter2-secret"])
def test_a_password_in_the_url_is_refused_and_never_echoed(value, tmp_path):
    with pytest.raises(ValueError, match="must not hold a password") as info:
        parse_store(value)
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError) as problems:
        load_config(config_dir(tmp_path, f"  store: {value!r}\n"))
    assert "hunter2" not in str(problems.value) and "inventory.yaml:" in str(problems.value)


def test_store_password_names_a_declared_secret(tmp_path):
    with pytest.raises(ConfigError, match=r"inventory.yaml:\d+: settings.store_password: unknown secret 'PGPASS'"):
        load_config(config_dir(tmp_path, "  store: postgresql://narwhal@db/narwhal\n  store_password: PGPASS\n"))


def test_store_password_without_a_postgresql_store_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("NARWHAL_PG", "a-long-password")
    secrets = "secrets:\n  PGPASS: {env: NARWHAL_PG}\n"
    with pytest.raises(ConfigError, match="only with a PostgreSQL store"):
        load_config(config_dir(tmp_path, "  store_password: PGPASS\n", secrets))


def test_the_password_comes_from_the_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("NARWHAL_PG", "a-long-password")
    secrets = "secrets:\n  PGPASS: {env: NARWHAL_PG}\n"
    config = load_config(config_dir(tmp_path, "  store: postgresql://narwhal@db/narwhal\n"
                                              "  store_password: PGPASS\n", secrets))
    assert config.settings.store == "postgresql://narwhal@db/narwhal"
    assert config.store_password() == "a-long-password"
    assert any("PostgreSQL store" in use for entry in config.secrets_overview() for use in entry.get("used_by", []))


def test_a_dispatcher_without_the_setting_keeps_sqlite_in_its_state_dir(tmp_path):
    d = Dispatcher(load_config(config_dir(tmp_path, "  max_attempts: 2\n")), tmp_path / "state")
    try:
        assert d.store.kind == "sqlite" and d.store.path == str(tmp_path / "state" / "narwhal.db")
    finally:
        d.stop()


def test_a_dispatcher_opens_the_postgresql_store_with_the_secret(tmp_path, monkeypatch, postgres):
    name = postgres.cluster.create_database(postgres.template)
    monkeypatch.setenv("NARWHAL_PG", postgres.cluster.password)
    secrets = "secrets:\n  PGPASS: {env: NARWHAL_PG}\n"
    config = load_config(config_dir(tmp_path, f"  store: {postgres.cluster.url(name)}\n  store_password: PGPASS\n",
                                    secrets))
    d = Dispatcher(config, tmp_path / "state")
    try:
        assert d.store.kind == "postgresql" and d.store.path == postgres.cluster.url(name)
        assert not (tmp_path / "state" / "narwhal.db").exists()
        [(job, created)] = d.store.create_jobs("/r", "a" * 40, "main", ["ci"])
        assert created and d.events.since(0).events[-1].data["id"] == job.id
    finally:
        d.stop()
        postgres.cluster.drop_database(name)


def test_a_wrong_password_says_so_without_the_password(postgres):
    name = postgres.template
    with pytest.raises(StoreUnavailable) as info:
        Store(postgres.cluster.url(name), password="not-the-password-42")
    message = str(info.value)
    assert "password authentication failed" in message and "not-the-password-42" not in message
    assert postgres.cluster.url(name) in message


def test_an_unreachable_database_says_where(tmp_path):
    with pytest.raises(StoreUnavailable, match=r"cannot use the PostgreSQL store postgresql://narwhal@127.0.0.1:1/x"):
        Store("postgresql://narwhal@127.0.0.1:1/x", password="whatever-it-is")


def test_a_rotated_password_is_used_for_new_connections(postgres, tmp_path, monkeypatch):
    """The secret changes and the config is reloaded: the pool's next connections log in with
    the new value (open ones stay), without a restart."""
    cluster = postgres.cluster
    role, database = f"rotator_{os.getpid()}", f"rotated_{os.getpid()}"
    cluster.admin(f"CREATE ROLE {role} LOGIN PASSWORD 'first-password'")
    cluster.admin(f"CREATE DATABASE {database} OWNER {role}")
    url = f"postgresql://{role}@127.0.0.1:{cluster.port}/{database}"
    secrets = "secrets:\n  PGPASS: {env: NARWHAL_PG}\n"
    settings = f"  store: {url}\n  store_password: PGPASS\n"
    monkeypatch.setenv("NARWHAL_PG", "first-password")
    d = Dispatcher(load_config(config_dir(tmp_path, settings, secrets)), tmp_path / "state")
    try:
        cluster.admin(f"ALTER ROLE {role} PASSWORD 'second-password'")
        monkeypatch.setenv("NARWHAL_PG", "second-password")
        d.reload(load_config(config_dir(tmp_path, settings, secrets)))
        d.store.backend._connect().close()  # noqa: SLF001 - a new connection, as the pool opens them
        assert d.store.create_jobs("/r", "b" * 40, "main", ["ci"])[0][1]
    finally:
        d.stop()
        cluster.drop_database(database)
        cluster.admin(f"DROP ROLE {role}")


def pg_config(tmp_path: Path, postgres, database: str, monkeypatch, name: str = "config") -> Path:
    monkeypatch.setenv("NARWHAL_PG", postgres.cluster.password)
    root = config_dir(tmp_path / name, f"  store: {postgres.cluster.url(database)}\n  store_password: PGPASS\n",
                      "secrets:\n  PGPASS: {env: NARWHAL_PG}\n")
    return root


def test_one_dispatcher_per_postgresql_database(tmp_path, monkeypatch, postgres):
    """Until active/active: a second dispatcher on the same database is refused, naming the first;
    the database frees the hold when the first one's connection ends."""
    database = postgres.cluster.create_database(postgres.template)
    try:
        first = Dispatcher(load_config(pg_config(tmp_path, postgres, database, monkeypatch, "a")), tmp_path / "sa")
        with pytest.raises(StoreInUse) as info:
            Dispatcher(load_config(pg_config(tmp_path, postgres, database, monkeypatch, "b")), tmp_path / "sb")
        assert f"narwhal {first.node.id[-8:]}" in str(info.value) and "127.0.0.1" in str(info.value)
        assert postgres.cluster.password not in str(info.value)
        first.node.register()
        assert first.health()["node"]["holds_database"] is True
        # the hold's connection ends (the database restarted, an operator): the next beat takes it again
        terminate = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name "
                     f"= 'narwhal {first.node.id[-8:]} {first.node.host} pid {os.getpid()}'")
        postgres.cluster.admin(terminate)
        assert first.node.beat() and first.health()["node"]["holds_database"] is True
        # ended again, and another dispatcher starts meanwhile (a cut that outlived the keepalives):
        # the first one does not hold the database any more, and says so
        postgres.cluster.admin(terminate)
        second = Dispatcher(load_config(pg_config(tmp_path, postgres, database, monkeypatch, "b")), tmp_path / "sb")
        first.node.beat()
        assert first.health()["node"]["holds_database"] is False
        first.stop()
        second.stop()
        third = Dispatcher(load_config(pg_config(tmp_path, postgres, database, monkeypatch, "c")), tmp_path / "sc")
        third.stop()
    finally:
        postgres.cluster.drop_database(database)


def test_a_lost_database_is_503_and_the_store_comes_back_with_it(tmp_path):
    """The server dies under a running store: calls fail as StoreUnavailable (the API's 503, not a
    driver traceback) within the pool's wait, and work again once the server is back, without a
    restart (broken pooled connections are dropped)."""
    import testbed
    from narwhal.dispatch.postgres import PostgresBackend
    from tests.conftest import require

    cluster = require(testbed.start_cluster)
    try:
        name = cluster.create_database()
        store = Store(PostgresBackend(cluster.url(name), password=cluster.password, pool_timeout=2))
        [(job, _)] = store.create_jobs("/r", "c" * 40, "main", ["ci"])
        cluster.stop_server()
        for call in (store.queue_length, lambda: store.start_job(job.id, "w", 1)):
            with pytest.raises(StoreUnavailable, match=f"the PostgreSQL store {cluster.url(name)}") as info:
                call()
            assert cluster.password not in str(info.value)
        cluster.start_server()
        assert store.start_job(job.id, "w", 1) and store.queue_length() == 0
        store.close()
    finally:
        cluster.stop()


def test_health_is_503_with_the_node_and_the_reason_while_the_database_is_away(tmp_path, monkeypatch):
    import webtest

    import testbed
    from narwhal.api.app import Boundary, make_app
    from tests.conftest import require

    cluster = require(testbed.start_cluster)
    try:
        name = cluster.create_database()
        monkeypatch.setenv("NARWHAL_PG", cluster.password)
        config = config_dir(tmp_path, f"  store: {cluster.url(name)}\n  store_password: PGPASS\n",
                            "secrets:\n  PGPASS: {env: NARWHAL_PG}\n")
        d = Dispatcher(load_config(config), tmp_path / "state")
        d.store.backend._pool_timeout = 2  # noqa: SLF001 - no half-minute wait in a test
        api = webtest.TestApp(make_app(d))
        d.node.register()
        assert api.get("/health").json["node"]["holds_database"] is True
        cluster.stop_server()
        d.node.beat()
        away = api.get("/health", expect_errors=True)
        assert away.status_int == 503 and away.json["status"] == "store unavailable"
        assert cluster.url(name) in away.json["reason"] and away.json["node"]["id"] == d.node.id
        assert away.json["node"]["holds_database"] is False and cluster.password not in away.text
        # where reads need the token, a probe without it learns that the node is down, not where the database is
        guarded = webtest.TestApp(make_app(d, token="t0ken-for-reads", boundary=Boundary(read_token=True)))
        probe = guarded.get("/health", expect_errors=True)
        assert probe.status_int == 503 and probe.json == {"status": "store unavailable"}
        assert str(cluster.port) not in probe.text and "narwhal@" not in probe.text
        cluster.start_server()
        d.node.beat()  # takes the hold again
        back = api.get("/health")
        assert back.status_int == 200 and back.json["node"]["holds_database"] is True
        d.stop()
    finally:
        cluster.stop()


# --- attacks on the store URL: a password in any spelling, libpq parameters that look elsewhere ---


@pytest.mark.parametrize("value", [
    "postgresql://db/narwhal?PASSWORD=hunter2-secret",  # another case
    "postgresql://db/narwhal?pass%77ord=hunter2-secret",  # libpq decodes a percent-encoded key
    "postgresql://db/narwhal?password%3Dhunter2-secret",
    "postgresql://narwhal%3Ahunter2-secret@db/narwhal",  # an encoded colon: libpq's user would be the secret
    "postgresql://narwhal%3ahunter2-secret@db/narwhal",
    "postgresql://narwhal:@db/narwhal",
    "postgresql://db/narwhal?sslmode=require&Password=hunter2-secret",
])
def test_a_password_in_any_spelling_is_refused_without_echo(value, tmp_path):
    with pytest.raises(ValueError, match="must not hold a password") as info:
        parse_store(value)
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError) as problems:
        load_config(config_dir(tmp_path, f"  store: {value!r}\n"))
    assert "hunter2" not in str(problems.value)


@pytest.mark.parametrize("value", [
    "postgresql://narwhal@db:hunter2-secret/narwhal",  # a password where the port goes
    "postgresql://db/narwhal?x=1;password=hunter2-secret",
    "postgresql://db/narwhal?zz_hunter2_secret=1",
    "postgresql://db/hunter2-secret#hunter2-secret",
    "mysql://db/hunter2-secret", "postgresql://db/narwhal?sslmode=hunter2 secret",
    "postgresql://db/narwhal?sslrootcert=%2Fhunter2-secret",
])
def test_a_refused_store_url_is_never_echoed(value, tmp_path):
    """Whatever is wrong with it, the message says what without showing the value: an operator
    may have put a secret in it in a spelling no check foresaw."""
    with pytest.raises(ValueError, match="expected none") as info:
        parse_store(value)
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError) as problems:
        load_config(config_dir(tmp_path, f"  store: {value!r}\n"))
    assert "hunter2" not in str(problems.value) and "inventory.yaml:" in str(problems.value)


@pytest.mark.parametrize(("parameter", "why"), [
    ("passfile=/etc/shadow", "read the password or the connection from another file"),
    ("service=prod", "read the password or the connection from another file"),
    ("host=evil.example.com", "in the URL itself"),  # messages would name db, libpq would go to evil
    ("hostaddr=10.0.0.66", "in the URL itself"),
    ("user=postgres", "in the URL itself"),
    ("dbname=postgres", "in the URL itself"),
    ("port=6543", "in the URL itself"),
    ("options=-cdefault_transaction_read_only:on", "session settings"),
    ("application_name=x", "narwhal sets it itself"),
    ("client_encoding=latin1", "narwhal sets it itself"),
    ("replication=database", "narwhal sets it itself"),
    ("sslkey=/k&keepalives=0&krbsrvname=x&nosuch=1", "not one of the libpq parameters"),
])
def test_libpq_parameters_that_look_elsewhere_are_refused(parameter, why):
    with pytest.raises(ValueError, match=why):
        parse_store(f"postgresql://narwhal@db/narwhal?sslmode=verify-full&{parameter}")


@pytest.mark.parametrize("value", [
    "postgresql://narwhal@db/narwhal?sslmode=verify-full&sslrootcert=/etc/narwhal/ca.pem"
    "&sslcert=/etc/narwhal/client.crt&sslkey=/etc/narwhal/client.key",
    "postgresql://narwhal@db1,db2/narwhal?target_session_attrs=read-write&connect_timeout=5",
    "postgresql://narwhal@%2Frun%2Fpostgresql/narwhal",  # a unix socket's directory
])
def test_parameters_to_reach_and_trust_the_server_are_taken(value):
    assert parse_store(value) == value


def test_a_store_on_a_unix_socket_works(postgres):
    """The host as a %2F-encoded socket directory (the way the URL names a unix socket, since
    ?host= is refused): the real cluster's socket."""
    from urllib.parse import quote

    cluster = postgres.cluster
    url = f"postgresql://narwhal@{quote(cluster.root, safe='')}:{cluster.port}/{postgres.template}"
    assert parse_store(url) == url
    with Store(url, password=cluster.password) as store:
        with store._tx(write=False) as db:  # noqa: SLF001 - where the session came from
            assert db.execute("SELECT inet_client_addr()").fetchone()[0] is None  # a unix socket, not TCP
        assert store.schema_version >= 1


# --- an operator's mistakes at start: a role without rights, versions side by side ---------------


def test_a_role_that_may_not_create_tables_is_told_so_not_a_traceback(postgres):
    """PostgreSQL 15 no longer lets every role create tables in schema public: a database made
    with CREATE DATABASE and GRANT ALL (not --owner) refuses narwhal's first table."""
    cluster = postgres.cluster
    role, database = f"weak_{os.getpid()}", f"weak_{os.getpid()}"
    cluster.admin(f"CREATE ROLE {role} LOGIN PASSWORD 'weak-password-1'")
    cluster.admin(f"CREATE DATABASE {database}")
    cluster.admin(f"GRANT ALL ON DATABASE {database} TO {role}")
    try:
        with pytest.raises(StoreUnavailable) as info:
            Store(f"postgresql://{role}@127.0.0.1:{cluster.port}/{database}", password="weak-password-1")
        message = str(info.value)
        assert "permission denied for schema public" in message and "must own the database" in message
        assert "weak-password-1" not in message
    finally:
        cluster.drop_database(database)
        cluster.admin(f"DROP ROLE {role}")


def test_a_newer_narwhal_does_not_move_the_schema_under_a_running_older_one(postgres):
    """A node of the next version joins a cluster (or a second lone dispatcher starts) while the
    old ones run: it would migrate the schema under them before the hold refused it. It is
    refused before touching anything, naming who holds the database; once they stopped, it may."""
    from narwhal.dispatch import postgres as pg

    for spec in postgres.spec():
        older = Store(spec.where, password=spec.password)
        older.backend.hold("0ld0ld00 ci-1 pid 4242", shared=True)  # a running node of the older version
        with older._tx() as db:  # noqa: SLF001 - the database as that older narwhal left it
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(pg.SCHEMA_VERSION - 1),))
        try:
            with pytest.raises(StoreInUse) as info:
                Store(spec.where, password=spec.password)
            message = str(info.value)
            assert f"schema {pg.SCHEMA_VERSION - 1}" in message and "narwhal 0ld0ld00 ci-1 pid 4242" in message
            assert "stop every narwhal serve" in message and spec.password not in message
            with older._tx(write=False) as db:  # noqa: SLF001 - nothing was migrated
                assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == \
                    str(pg.SCHEMA_VERSION - 1)
            with older._tx() as db:  # noqa: SLF001 - back to this version: the same version may join
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(pg.SCHEMA_VERSION),))
            Store(spec.where, password=spec.password).close()
        finally:
            older.close()
