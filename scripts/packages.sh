#!/usr/bin/env bash
# Install the Debian packages named as arguments that are not installed yet.
# With --no-start, their services are not started on install (the tests run their own).
set -euo pipefail

no_start=false
if [ "${1:-}" = --no-start ]; then no_start=true; shift; fi

need=()
for package in "$@"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || need+=("$package")
done
[ ${#need[@]} -eq 0 ] && exit 0

echo "==> installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if $no_start; then
  # policy-rc.d is Debian's switch that keeps maintainer scripts from starting services.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -qq "${need[@]}" >/dev/null
