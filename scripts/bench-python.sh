#!/usr/bin/env bash
# Installs what bench/batched_consumer.py (the bench's hand-written batched consumer)
# needs into the python3 on PATH, from PyPI, at pinned versions so that every run
# measures the same client libraries. Quick when they are already installed.
set -euo pipefail

CONFLUENT_KAFKA=2.16.1
PSYCOPG=3.3.9

if python3 - "$CONFLUENT_KAFKA" "$PSYCOPG" <<'PY' 2>/dev/null; then
import sys
import confluent_kafka
import psycopg
# psycopg's C implementation ("binary"), as psycopg[binary] installs it, not the pure
# Python one that a bare psycopg falls back to.
found = (confluent_kafka.version(), psycopg.__version__, psycopg.pq.__impl__)
ok = found == (sys.argv[1], sys.argv[2], "binary")
sys.exit(0 if ok else 1)
PY
  exit 0
fi
echo "[bench-python] installing confluent-kafka $CONFLUENT_KAFKA and psycopg[binary] $PSYCOPG" >&2
python3 -m pip install --quiet --disable-pip-version-check \
  "confluent-kafka==$CONFLUENT_KAFKA" "psycopg[binary]==$PSYCOPG"
