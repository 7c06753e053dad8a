#!/usr/bin/env bash
# `make test`: install what the tests need (Debian's PostgreSQL and RabbitMQ binaries, the
# venv with test tools), then lint and run the suite. The tests start their own servers on
# free ports; nothing here starts or touches the system's services.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/packages.sh --no-start postgresql rabbitmq-server python3-venv
bash scripts/venv.sh dev

echo "==> ruff"
.venv/bin/ruff check app tests
echo "==> mypy"
.venv/bin/mypy app/koerier
echo "==> pytest"
exec .venv/bin/pytest "$@"
