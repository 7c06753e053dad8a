#!/usr/bin/env bash
# The appliance's CI: lint, validate the Vagrantfile, and run both molecule scenarios
# (one Debian 12 host; database+broker and app hosts) with podman test hosts.
# Run as root from the repository root:  bash ci/appliance-test.sh [scenario ...]
# Ends with a plain "N passed, N failed" line and a non-zero exit on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."

export TESTHOST_DIR=${TESTHOST_DIR:-/var/tmp/koerier-testhost}
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -gt 0 ] || SCENARIOS=(default split)
SCENARIO_TIMEOUT=${SCENARIO_TIMEOUT:-1500}
LOG_DIR=${LOG_DIR:-$TESTHOST_DIR/logs}

passed=0
failed=0
failures=()
started=$SECONDS

pass() { passed=$((passed + ${2:-1})); printf '[appliance] PASS %s\n' "$1"; }
fail() { failed=$((failed + ${2:-1})); failures+=("$1"); printf '[appliance] FAIL %s\n' "$1"; }

# Test hosts of these scenarios only: other podman containers on the machine are left alone.
remove_test_hosts() {
  podman rm -f koerier-single koerier-data koerier-app >/dev/null 2>&1 || true
  podman network rm koerier-split >/dev/null 2>&1 || true
}
trap remove_test_hosts EXIT

if ! bash ci/setup-testhost.sh; then
  echo "0 passed, 1 failed"
  exit 1
fi
export PATH=$TESTHOST_DIR/venv/bin:$PATH
export ANSIBLE_FORCE_COLOR=false PY_COLORS=0 NO_COLOR=1
mkdir -p "$LOG_DIR"

APPLIANCE_PATHS=(roles playbooks inventories molecule)
if yamllint -s "${APPLIANCE_PATHS[@]}" .yamllint .ansible-lint; then pass yamllint; else fail yamllint; fi
if ansible-lint "${APPLIANCE_PATHS[@]}"; then pass ansible-lint; else fail ansible-lint; fi
if vagrant validate --ignore-provider; then pass "vagrant validate"; else fail "vagrant validate"; fi

for scenario in "${SCENARIOS[@]}"; do
  log=$LOG_DIR/molecule-$scenario.log
  t0=$SECONDS
  printf '[appliance] molecule test -s %s (log: %s)\n' "$scenario" "$log"
  CI=true timeout "$SCENARIO_TIMEOUT" molecule test -s "$scenario" </dev/null >"$log" 2>&1
  rc=$?
  # testinfra's own summary: "== 69 passed, 4 warnings in 23.46s =="
  summary=$(grep -E '=+ .*(passed|failed|error).* in [0-9.]+s' "$log" | tail -n 1)
  tests_passed=$(grep -oE '[0-9]+ passed' <<<"$summary" | grep -oE '[0-9]+' || true)
  tests_failed=$(grep -oE '[0-9]+ (failed|errors?)' <<<"$summary" | awk '{n += $1} END {print n + 0}')
  elapsed=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    pass "molecule $scenario: converge, idempotence, ${tests_passed:-0} testinfra checks (${elapsed}s)" \
      "$(( ${tests_passed:-0} + 1 ))"
  else
    tail -n 80 "$log"
    fail "molecule $scenario (rc $rc after ${elapsed}s, see $log)" "$(( tests_failed > 0 ? tests_failed : 1 ))"
    [ -n "$tests_passed" ] && passed=$((passed + tests_passed))
  fi
done

printf '[appliance] finished in %ss\n' "$((SECONDS - started))"
for failure in "${failures[@]}"; do printf '[appliance] failed: %s\n' "$failure"; done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
