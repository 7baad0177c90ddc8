#!/usr/bin/env bash
# Runs Ray's own `ray microbenchmark` and `rustyray microbenchmark` on this
# machine, one after the other, and prints one table: row, Ray, RustyRay,
# ratio. Also prints a plain memcpy bandwidth, the physical limit of the
# "put gigabytes" rows.
#
# Usage: bench/compare-with-ray.sh            # every row
#        TESTS_TO_RUN="actor" bench/compare-with-ray.sh
#
# Needs only Python 3 with venv/pip and the Rust toolchain; it installs
# ray[client]==2.60.0 (the suite imports grpc) and numpy from PyPI into
# bench/.venv (ignored by git).
# Outputs land in bench/out/ (ignored): ray.txt, rustyray.json, table.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

RAY_VERSION="${RAY_VERSION:-2.60.0}"
VENV="${VENV:-bench/.venv}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"

if ! "$VENV/bin/python" -c "import ray, grpc, numpy" >/dev/null 2>&1; then
  echo "== installing ray[client]==$RAY_VERSION and numpy into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "ray[client]==$RAY_VERSION" numpy
fi

echo "== building rustyray (release)"
cargo build --release -q -p rustyray-cli

echo "== ray microbenchmark (Ray $RAY_VERSION); this takes a while: Ray sleeps 10 s before each row"
# Ray's suite prints one line per row: "<name> per second <mean> +- <std>".
RAY_DISABLE_USAGE_STATS=1 "$VENV/bin/ray" microbenchmark 2>&1 | tee "$OUT/ray.txt" | grep --line-buffered "per second" || true
"$VENV/bin/ray" stop --force >/dev/null 2>&1 || true
if ! grep -q " per second " "$OUT/ray.txt"; then
  echo "ray microbenchmark produced no rows; see $OUT/ray.txt" >&2
  exit 1
fi

echo "== rustyray microbenchmark"
./target/release/rustyray microbenchmark --json > "$OUT/rustyray.json"

python3 - "$OUT/ray.txt" "$OUT/rustyray.json" "$RAY_VERSION" <<'PY' | tee "$OUT/table.txt"
import json, re, sys, platform, os, datetime
ray_txt, rr_json, ray_version = sys.argv[1], sys.argv[2], sys.argv[3]
ray = {}
for line in open(ray_txt, errors="replace"):
    m = re.match(r"^(.*) per second ([0-9.eE+-]+) \+- ([0-9.eE+-]+)\s*$", line.strip())
    if m:
        ray[m.group(1)] = (float(m.group(2)), float(m.group(3)))
rr = json.load(open(rr_json))
print(f"date: {datetime.date.today()}  machine: {platform.machine()}, {os.cpu_count()} CPUs")
print(f"Ray {ray_version} vs RustyRay {rr['version']} ({rr['mode']} mode)")
mc = rr.get("memcpy")
if mc:
    print(f"memcpy of the 800 MiB array into a reused buffer: {mc['gb_per_s']:.2f} GB/s "
          "(Ray's unit: 0.8 GB per array), the limit of the put gigabytes rows")
w = max(len(r["name"]) for r in rr["rows"])
print(f"{'row':<{w}}  {'Ray':>14}  {'RustyRay':>16}  {'ratio':>8}")
for r in rr["rows"]:
    name = r["name"]
    ours = r["per_second"]
    theirs = ray.get(name)
    t = f"{theirs[0]:.2f}" if theirs else "-"
    o = f"{ours:.2f}" if ours is not None else "not supported"
    ratio = f"{ours / theirs[0]:.1f}x" if (ours is not None and theirs and theirs[0] > 0) else "-"
    print(f"{name:<{w}}  {t:>14}  {o:>16}  {ratio:>8}")
PY
