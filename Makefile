# Koerier's entry points. Run as root on Debian 12; see README.md.
.PHONY: run test lint typecheck test-appliance perf clean help

help:
	@echo "make run             set up PostgreSQL, RabbitMQ and Koerier, serve on 127.0.0.1:8000"
	@echo "make test            the test suite (its own throwaway PostgreSQL and RabbitMQ)"
	@echo "make test-appliance  the Ansible roles on podman test hosts (molecule + testinfra)"
	@echo "make lint            ruff and mypy"
	@echo "make perf            load profile PROFILE (default tier-200); see docs/performance.md"

run:
	bash scripts/run.sh

test:
	bash scripts/test.sh

lint:
	bash scripts/venv.sh dev
	.venv/bin/ruff check app tests perf scripts
	.venv/bin/mypy app/koerier

perf:
	bash scripts/venv.sh dev
	perf/run $(or $(PROFILE),tier-200)

test-appliance:
	bash ci/appliance-test.sh

clean:
	rm -rf .venv build dist app/*.egg-info .pytest_cache .mypy_cache .ruff_cache
