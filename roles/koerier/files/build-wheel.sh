#!/bin/bash
# Build Koerier's wheel from a checkout, reproducibly, without touching the checkout.
# Usage: build-wheel.sh SOURCE_DIR OUTPUT_DIR PYTHON SOURCE_DATE_EPOCH
# Prints the wheel's path as its last line.
set -euo pipefail
source_dir=$1 output_dir=$2 python=$3
export SOURCE_DATE_EPOCH=$4

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Only what the build reads; a copy keeps build/ and *.egg-info out of the checkout.
for item in pyproject.toml setup.cfg setup.py MANIFEST.in README.md LICENSE LICENSE.txt app; do
  if [ -e "$source_dir/$item" ]; then cp -r "$source_dir/$item" "$work/"; fi
done
find "$work" -name __pycache__ -type d -prune -exec rm -rf {} +
# One timestamp for every file: setuptools copies mtimes into the wheel's zip entries.
find "$work" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$output_dir"
rm -f "$output_dir"/koerier-*.whl
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$output_dir" "$work" >&2
ls "$output_dir"/koerier-*.whl
