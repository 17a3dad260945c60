#!/usr/bin/env bash
# Throughput of `vae-pipeline precompute` vs --threads and --batch-size, as Markdown tables.
#
# Usage:
#   benches/scaling.sh [N]      N generated JPEGs (default 96; benches/make_jpeg_set.py, cached)
#   benches/scaling.sh -h | --help
#
# Environment (defaults): MODELS="taef2 avgpool8"  THREADS_LIST="1 2"  BATCH_LIST="1 4 8 16 32"
#   SIZE=256  BIN=target/release/vae-pipeline  PY=.venv/bin/python  SET_ROOT=target/bench
#   ORT_DYLIB_PATH=.ort/libonnxruntime.so.1.31.1
#
# Each cell is one run with a fresh output folder: images/s as the run's _SUCCESS reports it
# (images_per_second), and the peak RSS from /usr/bin/time -v. Exits non-zero if any run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  -*) echo "scaling.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
esac
N=${1:-96}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "scaling.sh: N='$N' is not a positive integer" >&2; usage >&2; exit 2; }

MODELS=${MODELS:-taef2 avgpool8}
THREADS_LIST=${THREADS_LIST:-1 2}
BATCH_LIST=${BATCH_LIST:-1 4 8 16 32}
SIZE=${SIZE:-256}
BIN=${BIN:-target/release/vae-pipeline}
PY=${PY:-.venv/bin/python}
SET_ROOT=${SET_ROOT:-target/bench}
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.ort/libonnxruntime.so.1.31.1}

[[ -x $BIN ]] || { echo "scaling.sh: $BIN not found: run 'make build'" >&2; exit 2; }
[[ -x $PY ]] || { echo "scaling.sh: $PY not found: run 'make setup'" >&2; exit 2; }
[[ -f $ORT_DYLIB_PATH ]] || { echo "scaling.sh: ONNX Runtime library $ORT_DYLIB_PATH not found: run 'make setup'" >&2; exit 2; }
[[ -x /usr/bin/time ]] || { echo "scaling.sh: /usr/bin/time (GNU time) is needed: apt-get install time" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vp-scaling.XXXXXX")
trap 'rm -rf "$work"' EXIT
results=$work/results.tsv
: >"$results"

set_dir=$SET_ROOT/jpegs-$N
"$PY" benches/make_jpeg_set.py "$set_dir" "$N" >&2
cat "$set_dir"/*.jpg >/dev/null # warm the page cache

echo "== $N JPEGs ($set_dir), --size $SIZE" >&2
for model in $MODELS; do
  for threads in $THREADS_LIST; do
    for batch in $BATCH_LIST; do
      out=$work/out
      rm -rf "$out"
      t0=$(date +%s.%N)
      rc=0
      /usr/bin/time -v -o "$work/time.txt" "$BIN" precompute --input "$set_dir" --out "$out" --model "$model" \
        --size "$SIZE" --threads "$threads" --batch-size "$batch" --overwrite >"$work/log" 2>&1 || rc=$?
      t1=$(date +%s.%N)
      if [[ $rc -ne 0 ]]; then
        echo "scaling.sh: FAILED ($rc): $model --threads $threads --batch-size $batch" >&2
        tail -n 30 "$work/log" >&2
        exit 1
      fi
      "$PY" - "$model" "$threads" "$batch" "$t0" "$t1" "$work/time.txt" "$out/_SUCCESS" "$N" >>"$results" <<'EOF'
import json, re, sys
model, threads, batch, t0, t1, timef, success, n = sys.argv[1:]
s = json.load(open(success))
if s["encoded"] != int(n):
    sys.exit(f"scaling.sh: {model} --threads {threads} --batch-size {batch} encoded {s['encoded']} of {n}")
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(timef).read()).group(1))
wall = float(t1) - float(t0)
print(model, threads, batch, s["images_per_second"], wall, rss, sep="\t")
print(f"  {model:<9} --threads {threads} --batch-size {batch:>3}: {s['images_per_second']:8.2f} images/s "
      f"(wall {wall:6.2f} s, peak RSS {rss / 1024:5.0f} MiB)", file=sys.stderr)
EOF
    done
  done
done

"$PY" - "$results" "$N" "$SIZE" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
n, size = sys.argv[2], sys.argv[3]
cell = {(m, int(t), int(b)): (float(ips), int(rss) / 1024) for m, t, b, ips, wall, rss in rows}
for m in dict.fromkeys(r[0] for r in rows):
    threads = sorted({k[1] for k in cell if k[0] == m})
    batches = sorted({k[2] for k in cell if k[0] == m})
    print(f"\n**{m}**, {n} JPEGs at --size {size}: images/s (peak RSS MiB)\n")
    print("| --batch-size | " + " | ".join(f"--threads {t}" for t in threads) + " |")
    print("|---:|" + "---:|" * len(threads))
    for b in batches:
        print(f"| {b} | " + " | ".join(f"{cell[(m, t, b)][0]:.1f} ({cell[(m, t, b)][1]:.0f})" for t in threads) + " |")
EOF
