"""Topic declarations and idempotent provisioning. [adapter]"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from backout.infra.broker import kafka_config
from backout.infra.settings import Settings
from backout.schemas.errors import ConfigError

_DAY_MS = 24 * 3600 * 1000
_FOREVER = "-1"


@dataclass(frozen=True)
class TopicSpec:
    """One of backout's topics: its short name, partitions and retention."""

    name: str
    partitions: int
    retention_ms: str
    purpose: str

    def config(self) -> dict[str, str]:
        """Topic-level configuration for creation."""
        return {"retention.ms": self.retention_ms, "cleanup.policy": "delete"}


def declared_topics(settings: Settings) -> list[TopicSpec]:
    """The design's topics with their partitions and retention."""
    parts = settings.actions_partitions
    return [
        TopicSpec("actions", parts, _FOREVER, "every tool call, blocked ones and inverse writes"),
        TopicSpec("control", 1, _FOREVER, "signed freeze/lift/approve/deny; history is evidence"),
        TopicSpec("signals", parts, str(365 * _DAY_MS), "detector findings with evidence"),
        TopicSpec("quarantine", parts, str(365 * _DAY_MS), "records parked from frozen scopes"),
        TopicSpec("dlq", 1, str(365 * _DAY_MS), "undecodable records, reason in headers"),
    ]


@dataclass(frozen=True)
class EnsureResult:
    """What ``ensure_topics`` did for one topic."""

    topic: str
    partitions: int
    created: bool


def ensure_topics(
    settings: Settings,
    bootstrap: str,
    *,
    timeout: float = 15.0,
    extra: list[TopicSpec] | None = None,
) -> list[EnsureResult]:
    """Create missing topics; existing ones are left alone. Safe to run again.

    Raises:
        ConfigError: the broker refused to create a topic.
    """
    admin = AdminClient(kafka_config(settings, bootstrap))
    specs = declared_topics(settings) + (extra or [])
    existing = admin.list_topics(timeout=timeout).topics
    missing = [s for s in specs if settings.topic(s.name) not in existing]
    created: set[str] = set()
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(
                    settings.topic(s.name),
                    s.partitions,
                    settings.replication_factor,
                    config=s.config(),
                )
                for s in missing
            ],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=timeout)
                created.add(name)
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise ConfigError(f"cannot create topic {name!r}: {exc}") from exc
    topics = admin.list_topics(timeout=timeout).topics
    return [
        EnsureResult(
            settings.topic(s.name),
            len(topics[settings.topic(s.name)].partitions)
            if settings.topic(s.name) in topics
            else 0,
            settings.topic(s.name) in created,
        )
        for s in specs
    ]
