"""Unit tests never talk to a broker: building a real Kafka client here fails the test."""

from __future__ import annotations

import sys

import pytest

_CLIENTS = ("Producer", "Consumer", "AdminClient")


class _NoKafkaInUnitTests:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError(
            "a unit test built a real Kafka client; use the in-memory fakes, or move the "
            "test to tests/integration")


@pytest.fixture(autouse=True)
def _forbid_real_kafka_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka
    import confluent_kafka.admin

    for name in _CLIENTS:
        for module in (confluent_kafka, confluent_kafka.admin):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _NoKafkaInUnitTests)
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("backout.") and module is not None:
            for name in _CLIENTS:
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, _NoKafkaInUnitTests)
