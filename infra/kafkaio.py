"""Small helpers around confluent-kafka messages and partitions. [adapter]"""

from __future__ import annotations

from confluent_kafka import Message


def offset_of(msg: Message) -> int:
    """The message's offset (consumed messages always have one)."""
    offset = msg.offset()
    return -1 if offset is None else offset


def partition_of(msg: Message) -> int:
    """The message's partition (consumed messages always have one)."""
    partition = msg.partition()
    return -1 if partition is None else partition


def value_of(msg: Message) -> bytes:
    """The message's value; a tombstone reads as empty bytes."""
    value = msg.value()
    return b"" if value is None else value


def position_of(msg: Message) -> str:
    """``topic/partition@offset`` for error messages and dead-letter headers."""
    return f"{msg.topic()}/{partition_of(msg)}@{offset_of(msg)}"
