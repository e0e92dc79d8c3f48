#!/usr/bin/env bash
# koan-backup against pg_dump -Fc and COPY | zstd -1 on the local PostgreSQL and
# RabbitMQ: backups, restores, 10,000 tiny chunks and worker peak RSS; prints a
# table and writes bench/results/<timestamp>.json. Not part of the test suite.
#
#   bench/run.sh [--rows N] [--workers N] [--concurrency N] [--runs N] [--tiny-chunks N] [--rss-rows N,N] [--keep]
#
# Scratch vhost and databases (koan_bench_<pid>*) are removed at the end, also
# on Ctrl-C. KOAN_BENCH_BIN=PATH measures that binary instead of building.
# Micro-benchmarks: cargo bench -p koan-source -p koan-worker -p koan-protocol
set -euo pipefail
cd "$(dirname "$0")/.."

pg_isready -h 127.0.0.1 -p 5432 >/dev/null || {
  echo "PostgreSQL is not answering on 127.0.0.1:5432; start it with: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2; exit 1; }
rabbitmqctl -q status >/dev/null 2>&1 || {
  echo "RabbitMQ is not running; start it with: rabbitmq-server -detached" >&2; exit 1; }
for tool in pg_dump pg_restore psql zstd python3; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install zstd postgresql-client python3)" >&2; exit 1; }
done

# KOAN_BENCH_BIN=PATH measures that binary instead (no build).
[ -n "${KOAN_BENCH_BIN:-}" ] || cargo build --release --quiet -p koan-backup
exec python3 bench/bench.py "$@"
