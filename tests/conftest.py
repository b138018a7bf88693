"""Shared fixtures: a real broker for integration tests, isolated settings per test, SQL URLs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from backout.infra import broker as broker_mod
from backout.infra.settings import Settings
from backout.infra.topics import ensure_topics
from tests.local_postgres import INSTALL_HINT, LocalPostgres, PostgresUnavailable, server_binaries


@pytest.fixture(scope="session")
def broker() -> Iterator[broker_mod.Broker]:
    """A real Kafka-compatible broker: BACKOUT_BOOTSTRAP, testcontainers, or embedded Tansu."""
    found = broker_mod.for_tests(Settings())
    try:
        yield found
    finally:
        found.stop()


def fresh_settings(bootstrap: str | None, tmp_path: Path, **extra: object) -> Settings:
    """Settings isolated to one test: own topic prefix, SQLite file and state dir."""
    return Settings(
        bootstrap=bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        db=f"sqlite:///{tmp_path / 'projection.db'}",
        state_dir=tmp_path / "state",
        actions_partitions=3,
        publish_timeout_s=10.0,
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
def kafka_settings(broker: broker_mod.Broker, tmp_path: Path) -> Settings:
    """Settings on the real broker with this test's topics created."""
    settings = fresh_settings(broker.bootstrap, tmp_path)
    ensure_topics(settings, broker.bootstrap)
    return settings


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL for SQL stores: ``BACKOUT_TEST_POSTGRES_URL`` (set by ``./run test``),
    else a private cluster started from the installed server for this test session."""
    url = os.environ.get("BACKOUT_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    binaries = server_binaries()
    if binaries is None:
        pytest.fail(INSTALL_HINT)
    try:
        server = LocalPostgres(binaries).start()
    except PostgresUnavailable as exc:
        pytest.fail(f"could not start PostgreSQL: {exc}. {INSTALL_HINT}")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def postgres_db(postgres_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = postgres_url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
