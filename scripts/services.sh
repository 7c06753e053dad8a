#!/usr/bin/env bash
# Install (when missing) and start the Debian packages Koerier runs on: PostgreSQL and
# RabbitMQ, for `make run` on a fresh Debian 12 machine. Works with and without systemd
# as PID 1 (containers and CI sandboxes have none). Run as root.
set -euo pipefail

bash "$(dirname "$0")/packages.sh" postgresql rabbitmq-server python3-venv curl

start() {
  local service=$1
  if [ "$(cat /proc/1/comm)" = systemd ]; then
    systemctl start "$service"
  else
    service "$service" start >/dev/null
  fi
}

if ! pg_lsclusters -h 2>/dev/null | grep -q online; then
  echo "==> starting PostgreSQL"
  start postgresql
fi
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  echo "==> starting RabbitMQ"
  start rabbitmq-server
  rabbitmqctl -q await_startup --timeout 120 >/dev/null
fi
