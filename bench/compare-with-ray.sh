#!/usr/bin/env bash
# Runs Ray's own `ray microbenchmark` and `rustyray microbenchmark` on this
# machine, one after the other (RustyRay in both of its modes: tasks on
# threads, then tasks in worker processes), and prints one table: row, Ray,
# RustyRay threads, ratio, RustyRay processes, ratio. Also prints the
# memory copy bandwidth (on one thread, and split across cores as large
# puts copy), the physical limit of the "put gigabytes" rows, and why each
# row without a figure has none.
#
# Usage: bench/compare-with-ray.sh            # every row
#        TESTS_TO_RUN="actor" bench/compare-with-ray.sh
#        RAY_OUTPUT=saved-ray.txt RUSTYRAY_OUTPUT=saved.json bench/compare-with-ray.sh
#
# TESTS_TO_RUN selects rows by substring, on both sides. RAY_OUTPUT (the
# saved output of `ray microbenchmark`) and RUSTYRAY_OUTPUT (of `rustyray
# microbenchmark --mode both --json`) replace running that side: with both,
# the script only prints the table.
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
RAY_OUTPUT="${RAY_OUTPUT:-}"
RUSTYRAY_OUTPUT="${RUSTYRAY_OUTPUT:-}"
mkdir -p "$OUT"

if [ -z "$RUSTYRAY_OUTPUT" ]; then
  # Built first: a build error stops the run before Ray's long suite.
  echo "== building rustyray (release)"
  cargo build --release -q -p rustyray-cli
fi

if [ -n "$RAY_OUTPUT" ]; then
  echo "== ray microbenchmark: using the saved output $RAY_OUTPUT"
  ray_txt="$RAY_OUTPUT"
else
  if ! "$VENV/bin/python" -c "import ray, grpc, numpy" >/dev/null 2>&1; then
    echo "== installing ray[client]==$RAY_VERSION and numpy into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet "ray[client]==$RAY_VERSION" numpy
  fi
  echo "== ray microbenchmark (Ray $RAY_VERSION); this takes a while: Ray sleeps 10 s before each row"
  # Ray's suite prints one line per row: "<name> per second <mean> +- <std>".
  RAY_DISABLE_USAGE_STATS=1 "$VENV/bin/ray" microbenchmark 2>&1 | tee "$OUT/ray.txt" | grep --line-buffered "per second" || true
  "$VENV/bin/ray" stop --force >/dev/null 2>&1 || true
  ray_txt="$OUT/ray.txt"
fi
if ! grep -q " per second " "$ray_txt"; then
  echo "ray microbenchmark produced no rows; see $ray_txt" >&2
  exit 1
fi

if [ -n "$RUSTYRAY_OUTPUT" ]; then
  echo "== rustyray microbenchmark: using the saved output $RUSTYRAY_OUTPUT"
  rr_json="$RUSTYRAY_OUTPUT"
else
  echo "== rustyray microbenchmark, threads mode then processes mode"
  # TESTS_TO_RUN reaches it through the environment, as it reaches Ray.
  ./target/release/rustyray microbenchmark --mode both --json > "$OUT/rustyray.json"
  rr_json="$OUT/rustyray.json"
fi

python3 - "$ray_txt" "$rr_json" "$RAY_VERSION" <<'PY' | tee "$OUT/table.txt"
import json, re, sys, platform, os, datetime
ray_txt, rr_json, ray_version = sys.argv[1], sys.argv[2], sys.argv[3]
MODES = ("threads", "processes")
ray = {}
for line in open(ray_txt, errors="replace"):
    m = re.match(r"^(.*) per second ([0-9.eE+-]+) \+- ([0-9.eE+-]+)\s*$", line.strip())
    if m:
        ray[m.group(1)] = (float(m.group(2)), float(m.group(3)))
rr = json.load(open(rr_json))
# (row name, mode) -> the row's record; names in Ray's order, as RustyRay
# reports them (every row of one mode, then every row of the next). A
# record without a mode comes from a single-mode run.
ours, names = {}, []
for r in rr["rows"]:
    mode = r.get("mode") or (rr["mode"] if rr["mode"] in MODES else "threads")
    ours[(r["name"], mode)] = r
    if r["name"] not in names:
        names.append(r["name"])
names += [n for n in ray if n not in names]
print(f"date: {datetime.date.today()}  machine: {platform.machine()}, {os.cpu_count()} CPUs")
print(f"Ray {ray_version} vs RustyRay {rr['version']} (--mode {rr['mode']})")
mc = rr.get("memcpy")
if mc:
    split = mc.get("split_gb_per_s")
    split = f", {split:.2f} GB/s split across cores" if split else ""
    print(f"memcpy of the 800 MiB array into a reused buffer: {mc['gb_per_s']:.2f} GB/s on one thread{split} "
          "(Ray's unit: 0.8 GB per array); a put that copies cannot beat the split copy")
rt = rr.get("process_round_trip")
if rt:
    print(f"process round trip over the node's socket: {rt:.0f} per second "
          "(the limit of a processes-mode sync row)")

def figure(name, mode):
    r = ours.get((name, mode))
    if r is None:
        return None, "-"
    if r["per_second"] is None:
        return None, "not supported"
    return r["per_second"], f"{r['per_second']:.2f}"

def ratio(value, theirs):
    return f"{value / theirs[0]:.1f}x" if (value is not None and theirs and theirs[0] > 0) else "-"

w = max(len(n) for n in names)
print(f"{'row':<{w}}  {'Ray':>14}  {'RustyRay threads':>16}  {'ratio':>8}  {'RustyRay processes':>18}  {'ratio':>8}")
for name in names:
    theirs = ray.get(name)
    t = f"{theirs[0]:.2f}" if theirs else "-"
    cells = []
    for mode, width in zip(MODES, (16, 18)):
        value, text = figure(name, mode)
        cells.append(f"{text:>{width}}  {ratio(value, theirs):>8}")
    print(f"{name:<{w}}  {t:>14}  {'  '.join(cells)}")

# Why rows have no figure: once per row when both modes agree.
notes = []
for name in names:
    why = {m: ours[(name, m)]["not_supported"] for m in MODES
           if (name, m) in ours and ours[(name, m)]["per_second"] is None}
    if len(why) == 2 and len(set(why.values())) == 1:
        notes.append(f"  {name}: {next(iter(why.values()))}")
    else:
        notes += [f"  {name} [{m}]: {reason}" for m, reason in why.items()]
if notes:
    print("not supported:")
    print("\n".join(notes))
PY
