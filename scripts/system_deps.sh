#!/usr/bin/env bash
# Debian packages the test suite needs beyond the virtual environment (tests/e2e: PostgreSQL and Redis
# servers; Chromium for the browser test, whose own download Playwright can't reach, with a font so
# its screenshots are legible). Idempotent and quick when everything is there; `make test` runs it first.
# HFLLM_SKIP_E2E=1 (the end-to-end tests skipped) skips it too.
set -euo pipefail

PACKAGES="postgresql redis-server chromium chromium-driver fonts-liberation"

[ "${HFLLM_SKIP_E2E:-}" = 1 ] && exit 0
missing=()
for p in $PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
  echo "system_deps.sh: no apt-get here; install ${missing[*]} (or set HFLLM_SKIP_E2E=1)" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "system_deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
