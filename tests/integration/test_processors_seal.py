"""What ``StateTable.seal`` relies on: after a one-record batch, the end a broker lists for
a partition (which table recovery reads up to) is the real end, even on a broker that
lists the base offset of a multi-record last batch (the embedded Tansu)."""

from __future__ import annotations

from confluent_kafka import Consumer, Producer, TopicPartition

from backout.infra.settings import Settings


def _listed_end(consumer: Consumer, topic: str) -> int:
    return int(consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1])


def test_a_one_record_batch_makes_the_listed_end_the_real_end(kafka_settings: Settings) -> None:
    topic = kafka_settings.topic("signals")
    producer = Producer({"bootstrap.servers": kafka_settings.bootstrap, "linger.ms": 50})
    for n in range(10):
        producer.produce(topic, b"first batch %d" % n, partition=0)
    producer.flush(10)
    for n in range(7):
        producer.produce(topic, b"second batch %d" % n, partition=0)
    producer.flush(10)
    # here Tansu lists 11 (the base offset of the last batch, plus one), Kafka 17
    consumer = Consumer({"bootstrap.servers": kafka_settings.bootstrap, "group.id": "seal"})
    try:
        producer.produce(topic, b"seal", partition=0)  # alone in its batch
        producer.flush(10)
        assert _listed_end(consumer, topic) == 18
    finally:
        consumer.close()
