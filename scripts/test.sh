#!/usr/bin/env bash
# The whole test suite: lint, types, then every test (unit, real etcd, kernel, lab, CNI).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
