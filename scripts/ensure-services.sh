#!/usr/bin/env bash
# Start the local PostgreSQL server the store tests use, if it is installed and not running.
# Under CI the PostgreSQL tests must run; elsewhere they skip with a reason when no server exists.
set -u
if command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; then
  exit 0
fi
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | head -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
  for _ in $(seq 1 20); do
    pg_isready -q -h 127.0.0.1 -p 5432 && exit 0
    sleep 0.5
  done
fi
echo "ensure-services: PostgreSQL is not reachable on 127.0.0.1:5432 (its tests will skip, or fail under CI=true)" >&2
exit 0
