#!/usr/bin/env bash
# Runs the test binaries of rustyray-shm (the one crate with `unsafe`) under
# valgrind's memcheck: any invalid read or write, use of uninitialised memory
# or bad free fails the run. Leak checking is off: the test harness's threads
# and process-lifetime allocations only add noise.
#
# The cross-process test runs here too: its child is the test binary started
# again without valgrind (memcheck does not follow children by default), so
# it checks the parent's side of the arena hand-off under memcheck.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1; then
  echo "valgrind is not installed; trying apt-get install -y valgrind" >&2
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq valgrind >&2 || true
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo apt-get install -y -qq valgrind >&2 || true
  fi
  if ! command -v valgrind >/dev/null 2>&1; then
    echo "error: valgrind is required and could not be installed (run as root, or install the valgrind package)" >&2
    exit 1
  fi
fi

# Memcheck slows code down some 20-50 times: run fewer property-test cases.
export PROPTEST_CASES="${PROPTEST_CASES:-16}"

echo "== building rustyray-shm test binaries"
json="$(cargo test -p rustyray-shm --no-run --message-format=json)"
mapfile -t binaries < <(printf '%s\n' "$json" \
  | grep '"reason":"compiler-artifact"' \
  | grep -o '"executable":"[^"]*"' \
  | sed 's/^"executable":"//; s/"$//' \
  | sort -u)
if [ "${#binaries[@]}" -eq 0 ]; then
  echo "error: no test binaries found for rustyray-shm" >&2
  exit 1
fi

status=0
for bin in "${binaries[@]}"; do
  echo "== valgrind $(basename "$bin")"
  if ! valgrind --tool=memcheck --error-exitcode=1 --leak-check=no --quiet \
      "$bin" --test-threads=2; then
    echo "error: $(basename "$bin") failed under valgrind" >&2
    status=1
  fi
done
if [ "$status" -eq 0 ]; then
  echo "valgrind: ${#binaries[@]} test binaries clean"
fi
exit "$status"
