#!/usr/bin/env python3
"""One kdedup replica against two in one consumer group, Kafka sink: does a second
replica add relay (and gate) capacity? `make bench` runs it (two rounds, `--json`); by
hand, after `make bench-quick` has built the release binary (bench/README.md, "Two relays
against one"):

    python3 bench/relays.py [--rounds 2] [--n 200000]

Each round runs one replica, then two, on a fresh 4-partition input topic, group, schema
and output topic of their own. The replicas start on the empty topic and are waited for
until the group has spread the 4 partitions over them (each holds the relay streams of its
partitions, `kdedup_relay_streams`). Then the replicas are paused (SIGSTOP), N events
with distinct ids are produced, and the replicas are resumed (SIGCONT) on that backlog; the
pause (about a second) is well inside the group's session timeout, so the group keeps its
members and assignment. The clock runs from the resume to the moment
`kdedup_events_forwarded_total`, summed over the replicas, reaches N (forwarded =
acknowledged on the output topic), as the end-to-end runs of `make bench` drain a backlog:
neither the input's production nor a group join is on it. Prints
both rates and their ratio per round. Uses the services of `make test`
(KDEDUP_TEST_BROKERS, KDEDUP_TEST_DATABASE_URL) and drops its schemas afterwards.
"""
import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = pathlib.Path(__file__).resolve().parent.parent
KDEDUP = ROOT / "target" / "release" / "kdedup"
BROKERS = os.environ.get("KDEDUP_TEST_BROKERS", "127.0.0.1:19092")
DATABASE = os.environ.get("KDEDUP_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
PARTITIONS = 4
FIRST_PORT = 19950


def metric(port, name):
    """The sum of every series of `name` on the sidecar at `port` (0 when unreachable)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start(replica, tag, topic, logs):
    port = FIRST_PORT + replica
    env = dict(
        os.environ,
        KDEDUP_BROKERS=BROKERS,
        KDEDUP_INPUT_TOPICS=topic,
        KDEDUP_OUTPUT_TOPIC=f"{topic}.out",
        KDEDUP_GROUP_ID=f"relays-{tag}",
        KDEDUP_DATABASE_URL=DATABASE,
        KDEDUP_DB_SCHEMA=f"relays_{tag}",
        # The test broker: a short session (a group join takes half of it on tansu), a
        # drain deadline below it, one replica per partition, and the bench's fetch wait.
        KDEDUP_KAFKA_SESSION_TIMEOUT_MS="6000",
        KDEDUP_SHUTDOWN_TIMEOUT="5s",
        KDEDUP_TOPIC_REPLICATION_FACTOR="1",
        KDEDUP_KAFKA_FETCH_WAIT_MAX_MS="20",
        KDEDUP_METRICS_ADDR=f"127.0.0.1:{port}",
        KDEDUP_LOG=os.environ.get("KDEDUP_LOG", "warn"),
    )
    log = open(logs / f"relays-{tag}-{replica}.log", "w")
    return subprocess.Popen([str(KDEDUP), "run"], env=env, stdout=log, stderr=log), port


def run(replicas, n, logs):
    """events/s of `replicas` replicas over `n` new events, and the streams each held."""
    tag = uuid.uuid4().hex[:8]
    topic = f"relays_{tag}.in"
    admin = AdminClient({"bootstrap.servers": BROKERS})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result()
    sidecars = [start(r, tag, topic, logs) for r in range(replicas)]
    ports = [port for _, port in sidecars]
    try:
        deadline = time.time() + 90
        while True:
            assigned = [metric(p, "kdedup_assigned_partitions") for p in ports]
            if sum(assigned) == PARTITIONS and all(a > 0 for a in assigned):
                break
            if time.time() > deadline:
                sys.exit(f"{replicas} replica(s): partitions not spread over them: {assigned}")
            time.sleep(0.2)
        # Paused while the input is produced: they start on the whole backlog together,
        # as the group spread it.
        for proc, _ in sidecars:
            proc.send_signal(signal.SIGSTOP)
        producer = Producer({"bootstrap.servers": BROKERS, "linger.ms": 20,
                             "queue.buffering.max.messages": 1_000_000})
        for i in range(n):
            event_id = f"{tag}-{i:09d}"
            value = '{"id":"%s","n":%d,"note":"%s"}' % (event_id, i, "x" * 200)
            producer.produce(topic, partition=i % PARTITIONS, key=f"customer-{i % 1000:05d}",
                             value=value, headers={"event-id": event_id})
            if i % 10_000 == 0:
                producer.poll(0)
        left = producer.flush(60)
        if left:
            sys.exit(f"{left} of {n} input events not acknowledged by the broker")
        for proc, _ in sidecars:
            proc.send_signal(signal.SIGCONT)
        started = time.time()
        deadline = started + 120 + n / 1000
        while True:
            forwarded = sum(metric(p, "kdedup_events_forwarded_total") for p in ports)
            now = time.time()
            if forwarded >= n:
                break
            if now > deadline:
                sys.exit(f"{replicas} replica(s): forwarded {forwarded} of {n} in time")
            time.sleep(0.02)
        streams = [metric(p, "kdedup_relay_streams") for p in ports]
        return n / (now - started), streams
    finally:
        for proc, _ in sidecars:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        for proc, _ in sidecars:
            proc.wait(timeout=30)
        with psycopg.connect(DATABASE, autocommit=True) as db:
            db.execute(f'DROP SCHEMA IF EXISTS "relays_{tag}" CASCADE')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--json", action="store_true",
                    help="print each round as one JSON object per line (for the bench)")
    args = ap.parse_args()
    if not KDEDUP.exists():
        sys.exit(f"{KDEDUP} is missing: cargo build --release --locked --bin kdedup")
    logs = ROOT / ".tmp" / "bench" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for r in range(args.rounds):
        one, s1 = run(1, args.n, logs)
        two, s2 = run(2, args.n, logs)
        if args.json:
            print(json.dumps({"one": one, "two": two, "streams_one": s1, "streams_two": s2}),
                  flush=True)
        else:
            print(f"round {r + 1}: one replica {one:.0f} events/s (streams {s1}), "
                  f"two replicas {two:.0f} events/s (streams {s2}): two / one = {two / one:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
