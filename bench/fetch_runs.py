#!/usr/bin/env python3
"""How a broker hands a backlog to a consumer: the runs of one partition, in delivery order.

Produces N small messages round-robin into a fresh 4-partition topic, then reads them with
confluent-kafka under the bench's consumer settings (fetch.wait.max.ms=20, a 16 MiB
prefetch) and prints the length of every run of consecutive messages from one partition.
Apache Kafka bounds a partition's share of a fetch response by max.partition.fetch.bytes
(1 MiB by default, about 3,500 of these messages); a longer run means the broker does not,
and kdedup's read-ahead (--read-ahead-bytes) must hold a whole run for the other gate lanes
to be fed meanwhile (bench/README.md, "Bench tuning").

    python3 bench/fetch_runs.py [--brokers 127.0.0.1:19092] [--n 200000]
"""
import argparse
import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", default="127.0.0.1:19092")
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    topic = "fetch-runs-" + uuid.uuid4().hex[:8]
    admin = AdminClient({"bootstrap.servers": args.brokers})
    admin.create_topics([NewTopic(topic, 4, 1)])[topic].result()
    try:
        producer = Producer({"bootstrap.servers": args.brokers, "linger.ms": 5})
        value = b"x" * 256
        for i in range(args.n):
            while True:
                try:
                    producer.produce(topic, value, partition=i % 4)
                    break
                except BufferError:
                    producer.poll(0.1)
        producer.flush()
        consumer = Consumer({
            "bootstrap.servers": args.brokers,
            "group.id": topic,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 20,
            "queued.max.messages.kbytes": 16384,
        })
        consumer.subscribe([topic])
        runs: list[list[int]] = []
        read, started = 0, time.time()
        while read < args.n and time.time() - started < 120:
            m = consumer.poll(1)
            if m is None or m.error():
                continue
            read += 1
            if runs and runs[-1][0] == m.partition():
                runs[-1][1] += 1
            else:
                runs.append([m.partition(), 1])
        consumer.close()
        lengths = sorted(n for _, n in runs)
        print(f"read {read} of {args.n} messages in {len(runs)} runs of one partition")
        print("runs in delivery order (partition, messages):", [tuple(r) for r in runs[:24]])
        if lengths:
            print(f"run length: median {lengths[len(lengths) // 2]}, longest {lengths[-1]}")
    finally:
        admin.delete_topics([topic])


if __name__ == "__main__":
    main()
