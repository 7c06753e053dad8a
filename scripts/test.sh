#!/usr/bin/env bash
# `make test`: install what the tests need (Debian's PostgreSQL and RabbitMQ binaries, the
# venv with test tools), then lint and run the suite. The tests start their own servers on
# free ports; nothing here starts or touches the system's services.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for package in postgresql rabbitmq-server python3-venv; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || need+=("$package")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d keeps the packages' own services from starting: the tests run their own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq "${need[@]}" >/dev/null || { rm -f /usr/sbin/policy-rc.d; exit 1; }
  rm -f /usr/sbin/policy-rc.d
fi
bash scripts/venv.sh dev

echo "==> ruff"
.venv/bin/ruff check app tests
echo "==> pytest"
exec .venv/bin/pytest "$@"
