#!/usr/bin/env python3
"""The hand-written batched consumer that `make bench` compares kdedup with.

What a capable team writes in an afternoon with confluent-kafka and psycopg 3:

    loop:
        consume up to 1000 messages
        one statement: INSERT ... SELECT FROM UNNEST(...) ON CONFLICT DO NOTHING
                       RETURNING event_id           (the batch deduplicated first)
        COMMIT
        produce the first-seen messages (idempotent producer), flush
        store the batch's offsets (auto-commit sends them)

It is not crash-safe: a crash between COMMIT and the end of the flush leaves events
recorded as seen that were never forwarded, and no later run forwards them. kdedup's
outbox and relay are what that guarantee costs; this baseline does not pay it. It keeps
ids forever (no expiry, no pruning) and has no dead-letter topic: a message without an
id is skipped.

The event id comes from the `event-id` header (`--id-header`), where the bench's input
carries it and where kdedup's default `--id-from header:event-id` reads it; the dedup
scope is the consumer group. The table lives in a schema of its own, created here, and is
keyed by the first 16 bytes of SHA-256 over (scope, id) stored as uuid, the key layout
kdedup's migration 3 chose for its index size. The output keeps the input message's key,
value, headers and timestamp.

Prints one JSON line when done: events consumed, first-seen events forwarded, duplicates,
seconds from the first batch in hand to the last flush, and events/s. The clock starts
when the first batch is in hand, so the rate counts the messages consumed after it (as the
harness counts kdedup's after its first poll of /metrics).

Requires confluent-kafka and psycopg 3 (scripts/bench-python.sh installs them).
"""

import argparse
import hashlib
import json
import sys
import time

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from psycopg import sql


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--brokers", default="127.0.0.1:19092")
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True, help="consumer group; also the dedup scope")
    p.add_argument("--output-topic", required=True)
    p.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/test")
    p.add_argument("--schema", required=True, help="created if missing, with the table in it")
    p.add_argument("--id-header", default="event-id")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument(
        "--batch-wait-ms",
        type=int,
        default=20,
        help="longest wait for a batch to fill (kdedup's default batch linger when this baseline was written)",
    )
    p.add_argument(
        "--count", type=int, default=0, help="stop after this many messages (0: no limit)"
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=30.0,
        help="stop when nothing arrived for this long",
    )
    p.add_argument(
        "-X",
        dest="kafka_property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka property for the consumer (repeatable)",
    )
    return p.parse_args()


def log(msg):
    print(f"[batched] {msg}", file=sys.stderr, flush=True)


def main():
    args = parse_args()
    started = time.monotonic()
    table = sql.Identifier(args.schema, "seen_events")

    db = psycopg.connect(args.database_url, autocommit=True)
    db.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(args.schema)))
    db.execute(
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {} (
                event_key uuid PRIMARY KEY,
                event_id text NOT NULL,
                source_partition integer NOT NULL,
                source_offset bigint NOT NULL,
                first_seen_at timestamptz NOT NULL DEFAULT now()
            )"""
        ).format(table)
    )
    db.autocommit = False
    # Keys arrive as 32 hex digits, which uuid's input accepts; event_id comes back so
    # that the first-seen rows can be matched to their messages.
    insert = sql.SQL(
        """INSERT INTO {} (event_key, event_id, source_partition, source_offset)
        SELECT * FROM UNNEST(%s::uuid[], %s::text[], %s::int4[], %s::int8[])
        ON CONFLICT DO NOTHING
        RETURNING event_id"""
    ).format(table)

    delivery_errors = []

    def on_delivery(err, _msg):
        if err is not None:
            delivery_errors.append(err)

    producer = Producer(
        {
            "bootstrap.servers": args.brokers,
            "enable.idempotence": True,
            "linger.ms": 5,
            # Only failures need a callback; a callback per message costs Python time.
            "delivery.report.only.error": True,
            "on_delivery": on_delivery,
        }
    )

    # A missing output topic fails here, at start-up, rather than at the first flush; and
    # the first batch does not wait for the topic's metadata (fetched on the first produce
    # otherwise: the first flush then took ~0.8 s on the test broker, later ones ~10 ms).
    metadata = producer.list_topics(args.output_topic, timeout=10)
    topic_md = metadata.topics.get(args.output_topic)
    if topic_md is None or topic_md.error is not None:
        log(f"output topic {args.output_topic}: {topic_md.error if topic_md else 'missing'}")
        return 1

    conf = {
        "bootstrap.servers": args.brokers,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        # Offsets are stored by hand once a batch is forwarded; the auto-commit sends them.
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        # The test broker (tansu) completes a group join after session.timeout.ms / 2.
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    }
    for kv in args.kafka_property:
        k, _, v = kv.partition("=")
        conf[k] = v
    consumer = Consumer(conf)
    consumer.subscribe([args.topic])

    # The scope, length-prefixed so that no (scope, id) pair can collide with another.
    scope = args.group.encode()
    key_prefix = len(scope).to_bytes(4, "big") + scope
    id_header = args.id_header
    batch_wait = args.batch_wait_ms / 1000.0
    output = args.output_topic

    consumed = forwarded = duplicates = no_id = batches = 0
    first_batch = 0
    t0 = t_last = None
    cpu0 = 0.0
    last_msg = time.monotonic()

    while args.count == 0 or consumed < args.count:
        want = args.batch_size if args.count == 0 else min(args.batch_size, args.count - consumed)
        msgs = consumer.consume(num_messages=want, timeout=batch_wait)
        if not msgs:
            if time.monotonic() - last_msg > args.idle_seconds:
                log(f"nothing for {args.idle_seconds}s; stopping at {consumed} messages")
                break
            continue
        if t0 is None:
            t0 = time.monotonic()
            cpu0 = time.process_time()
            first_batch = len(msgs)
        last_msg = time.monotonic()

        # The first copy of each id in the batch: later copies are duplicates already.
        first = {}
        ends = {}
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                # Transient (the client retries by itself) or a partition's end.
                if err.code() != KafkaError._PARTITION_EOF:
                    log(f"consumer: {err}")
                continue
            consumed += 1
            ends[(m.topic(), m.partition())] = m.offset() + 1
            event_id = None
            for name, value in m.headers() or ():
                if name == id_header:
                    event_id = value
                    break
            if not event_id:
                no_id += 1
                continue
            event_id = event_id.decode()
            if event_id in first:
                duplicates += 1
            else:
                first[event_id] = m

        if first:
            ids = list(first)
            keys = [hashlib.sha256(key_prefix + i.encode()).hexdigest()[:32] for i in ids]
            parts = [first[i].partition() for i in ids]
            offsets = [first[i].offset() for i in ids]
            with db.cursor() as cur:
                cur.execute(insert, (keys, ids, parts, offsets))
                inserted = {row[0] for row in cur.fetchall()}
            db.commit()
            duplicates += len(ids) - len(inserted)
            for i in ids:
                if i in inserted:
                    m = first[i]
                    while True:
                        try:
                            producer.produce(
                                output,
                                value=m.value(),
                                key=m.key(),
                                headers=m.headers(),
                                timestamp=m.timestamp()[1],
                            )
                            break
                        except BufferError:
                            producer.poll(0.01)
            left = producer.flush(60)
            if left or delivery_errors:
                log(f"output not delivered: {left} unacknowledged, errors: {delivery_errors[:3]}")
                return 1
            forwarded += len(inserted)
        consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()])
        batches += 1
        t_last = time.monotonic()

    cpu = time.process_time() - cpu0
    # close() commits the stored offsets and leaves the group (not timed).
    consumer.close()
    db.close()
    seconds = (t_last - t0) if t0 is not None and t_last is not None else 0.0
    counted = consumed - first_batch
    print(
        json.dumps(
            {
                "consumed": consumed,
                "forwarded": forwarded,
                "duplicates": duplicates,
                "no_id": no_id,
                "batches": batches,
                "startup_s": round((t0 - started) if t0 is not None else 0.0, 3),
                "seconds": round(seconds, 3),
                "events_per_s": round(counted / seconds, 1) if seconds > 0 else 0.0,
                "cpu_cores": round(cpu / seconds, 3) if seconds > 0 else 0.0,
            }
        ),
        flush=True,
    )
    if args.count and consumed < args.count:
        log(f"consumed {consumed} of the {args.count} expected")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
