#!/usr/bin/env bash
# Debian packages the test suite needs beyond the virtual environment. Idempotent and quick when
# everything is there; `make test` runs it first.
#  - always: a Java runtime for Spark (tests/integration/test_readers.py reads the output folder with
#    pyspark, which starts a local JVM; that test fails rather than skips without one). Java 17
#    (Debian 12) or 21 (Debian 13, which has no 17): the Javas pyspark 3.5 runs on.
#  - tests/e2e: PostgreSQL and Redis servers; Chromium for the browser test, whose own download
#    Playwright can't reach, with a font so its screenshots are legible. HFLLM_SKIP_E2E=1 (the
#    end-to-end tests skipped) skips these.
set -euo pipefail

E2E_PACKAGES="postgresql redis-server chromium chromium-driver fonts-liberation"
JRE_PACKAGES="openjdk-17-jre-headless openjdk-21-jre-headless"  # either will do; the first that apt has

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
need_jre=1
for p in $JRE_PACKAGES; do
  if installed "$p"; then need_jre=0; break; fi
done
if [ "${HFLLM_SKIP_E2E:-}" != 1 ]; then
  for p in $E2E_PACKAGES; do
    installed "$p" || missing+=("$p")
  done
fi
[ ${#missing[@]} -eq 0 ] && [ "$need_jre" = 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
  [ "$need_jre" = 1 ] && missing+=("a Java 17 or 21 runtime (Debian: openjdk-17-jre-headless)")
  echo "system_deps.sh: no apt-get here; install ${missing[*]} (HFLLM_SKIP_E2E=1 skips the e2e ones)" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
if [ "$need_jre" = 1 ]; then
  jre=""
  for p in $JRE_PACKAGES; do
    if apt-cache show "$p" >/dev/null 2>&1; then jre=$p; break; fi
  done
  if [ -z "$jre" ]; then
    echo "system_deps.sh: apt has none of $JRE_PACKAGES; install a Java 17 or 21 runtime for Spark" >&2
    exit 1
  fi
  missing+=("$jre")
  # slim images drop /usr/share/man, where the JRE's postinst links java.1 (update-alternatives fails)
  $sudo mkdir -p /usr/share/man/man1
fi
echo "system_deps.sh: installing ${missing[*]}"
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
