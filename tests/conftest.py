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


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


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
def postgres_url() -> str:
    """A PostgreSQL URL for SQL stores (``BACKOUT_TEST_POSTGRES_URL``; set by ./run test)."""
    url = os.environ.get("BACKOUT_TEST_POSTGRES_URL")
    if not url:
        if _in_ci():
            pytest.fail("BACKOUT_TEST_POSTGRES_URL is not set in CI; ./run test starts PostgreSQL")
        pytest.skip("no PostgreSQL: set BACKOUT_TEST_POSTGRES_URL (./run test does)")
    return url


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
