#!/usr/bin/env bash
# Create .venv and install Koerier with pinned dependencies; `dev` adds the test tools.
# Re-running is cheap: pip is skipped when the requirement files have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv

files=(requirements.txt pyproject.toml)
[ "${1:-}" = dev ] && files+=(requirements-dev.txt)
stamp=.venv/.installed-$(cat "${files[@]}" | sha256sum | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "==> installing Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  if [ "${1:-}" = dev ]; then
    .venv/bin/pip install -q -r requirements-dev.txt
  else
    .venv/bin/pip install -q -r requirements.txt
  fi
  .venv/bin/pip install -q --no-deps -e .
  touch "$stamp"
fi
