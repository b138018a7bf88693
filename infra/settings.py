"""One Settings object for every backout component (environment prefix ``BACKOUT_``).

Built once in an entrypoint and passed down; no other module reads the environment.
Nested options use ``__``: ``BACKOUT_KAFKA__SECURITY_PROTOCOL`` is not how librdkafka
options pass, though: give them as JSON in ``BACKOUT_KAFKA`` (``{"linger.ms": "5"}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DeliveryMode = Literal["confirm", "background"]

# librdkafka options we set ourselves and that must not be overridden by pass-through options.
_RESERVED_KAFKA_KEYS = frozenset({"bootstrap.servers"})


class Settings(BaseSettings):
    """Configuration for producers, processors, projections, rollback and the CLI."""

    model_config = SettingsConfigDict(
        env_prefix="BACKOUT_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    bootstrap: str | None = None
    """Kafka bootstrap servers. Unset: the embedded broker started by ``backout broker``
    or ``backout up`` (found through ``state_dir``), or one a test or the demo starts."""
    topic_prefix: str = "backout."
    """Prefix of every topic name (``backout.actions``, ``backout.control``, ...)."""
    actions_partitions: int = Field(default=6, ge=1)
    """Partitions of the actions topic (records keyed by target keep their order)."""
    replication_factor: int = Field(default=1, ge=1)
    kafka: dict[str, str] = Field(default_factory=dict)
    """Extra librdkafka options for every client, in librdkafka names."""
    schema_registry_url: str | None = None
    """When set, records use Confluent Schema Registry framing instead of single-object."""
    db: str = "sqlite:///backout.db"
    """SQLAlchemy URL of the projections (PostgreSQL in production)."""
    environment: str = "production"
    """Default environment label of journaled runs."""
    delivery: DeliveryMode = "confirm"
    """``confirm``: a call returns after the broker acknowledged its event.
    ``background``: events are queued (bounded, blocking when full) and flushed on close."""
    publish_timeout_s: float = Field(default=10.0, gt=0)
    """How long a confirm-mode publish may wait for the broker before PublishError."""
    background_queue_size: int = Field(default=100_000, ge=1)
    """Events a background-mode Journal holds before a call blocks."""
    control_staleness_s: float = Field(default=10.0, gt=0)
    """A guard that has not heard from the control topic for this long fails closed."""
    fail_open: bool = False
    """When the control topic is stale: False refuses mutating calls, True lets them run."""
    control_max_age_s: float = Field(default=86_400.0, gt=0)
    """A control command appended longer than this after it was issued is expired (ignored,
    and a Signal is raised): signed commands are published when they are made."""
    trusted_keys: dict[str, str] = Field(default_factory=dict)
    """Key id to base64 Ed25519 public key: who may sign control commands."""
    signing_key_file: Path | None = None
    """Private key (PEM) this process signs control commands with (operators, processors)."""
    approval_timeout_s: float = Field(default=300.0, gt=0)
    """How long an approval gate waits for a decision before it denies."""
    state_dir: Path = Path(".backout")
    """Where the embedded broker's address and operator state files live."""
    metrics_port: int | None = None
    """Port for Prometheus metrics of processors and projector; unset disables them."""
    policy_file: Path | None = None
    """Containment policy of the processors (YAML); unset: the packaged default policy."""

    @field_validator("kafka")
    @classmethod
    def _no_reserved_kafka_keys(cls, value: dict[str, str]) -> dict[str, str]:
        clash = sorted(_RESERVED_KAFKA_KEYS & value.keys())
        if clash:
            raise ValueError(f"set {clash[0]!r} with BACKOUT_BOOTSTRAP, not BACKOUT_KAFKA")
        return value

    def topic(self, name: str) -> str:
        """The full name of one of backout's topics: ``topic('actions')``."""
        return f"{self.topic_prefix}{name}"
