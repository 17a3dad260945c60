#!/usr/bin/env bash
# End-to-end comparison of `vae-pipeline precompute` against benches/reference_pipeline.py, a
# competent Python peer (multiprocessing Pillow decode+resize, batched onnxruntime, zstd Parquet),
# on the same generated JPEG set, same model, same thread budget, runs alternated.
#
# Usage:
#   benches/compare.sh [N] [ROUNDS]          N images (default 240), ROUNDS alternations (default 3)
#   benches/compare.sh --rss [SMALL] [LARGE] peak RSS of ours at SMALL vs LARGE images (200, 2000)
#   benches/compare.sh -h | --help
#
# Environment (defaults): MODELS="avgpool8 taef2"  THREADS=2  BATCH=4  SIZE=256
#   DRAFT=1 (also run the peer with --draft)  DRAFT_GAP=1 (its --draft-gap; 2 = Image.thumbnail's
#   reducing_gap, a no-op for 768x512 -> 256)  ENCODER_ONLY=1 (taef2: measure our encoder alone)
#   BIN=target/release/vae-pipeline  PY=.venv/bin/python  SET_ROOT=target/bench (JPEG set cache)
#   ORT_DYLIB_PATH=.ort/libonnxruntime.so.1.31.1
#
# Every run is under /usr/bin/time -v (wall seconds, peak RSS) with a fresh output folder. The
# peer's peak RSS is the largest single process (GNU time reports the max over the process tree,
# not the sum of the main process and its decode workers). Exits non-zero if any run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

mode=compare
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --rss) mode=rss; shift ;;
  -*) echo "compare.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
esac
if [[ $mode == rss ]]; then
  SMALL=${1:-200}; LARGE=${2:-2000}; nums=("$SMALL" "$LARGE")
else
  N=${1:-240}; ROUNDS=${2:-3}; nums=("$N" "$ROUNDS")
fi
for v in "${nums[@]}"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: '$v' is not a positive integer" >&2; usage >&2; exit 2; }
done

MODELS=${MODELS:-avgpool8 taef2}
THREADS=${THREADS:-2}
BATCH=${BATCH:-4}
SIZE=${SIZE:-256}
DRAFT=${DRAFT:-1}
DRAFT_GAP=${DRAFT_GAP:-1}
ENCODER_ONLY=${ENCODER_ONLY:-1}
BIN=${BIN:-target/release/vae-pipeline}
PY=${PY:-.venv/bin/python}
SET_ROOT=${SET_ROOT:-target/bench}
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.ort/libonnxruntime.so.1.31.1}

[[ -x $BIN ]] || { echo "compare.sh: $BIN not found: run 'make build'" >&2; exit 2; }
[[ -x $PY ]] || { echo "compare.sh: $PY not found: run 'make setup'" >&2; exit 2; }
[[ -f $ORT_DYLIB_PATH ]] || { echo "compare.sh: ONNX Runtime library $ORT_DYLIB_PATH not found: run 'make setup'" >&2; exit 2; }
[[ -x /usr/bin/time ]] || { echo "compare.sh: /usr/bin/time (GNU time) is needed for peak RSS: apt-get install time" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vp-compare.XXXXXX")
trap 'rm -rf "$work"' EXIT
results=$work/results.tsv
: >"$results"

# jpeg_set N: makes (or reuses) the cached set of N JPEGs; prints its folder.
jpeg_set() {
  local dir=$SET_ROOT/jpegs-$1
  "$PY" benches/make_jpeg_set.py "$dir" "$1" >&2
  cat "$dir"/*.jpg >/dev/null # warm the page cache: every run reads from memory
  echo "$dir"
}

# timed MODEL VARIANT ROUND OUT CMD...: runs CMD under /usr/bin/time -v with a fresh OUT, appends
# "model variant round wall_s rss_kb images encode_s images_per_second" to the results.
timed() {
  local model=$1 variant=$2 round=$3 out=$4
  shift 4
  rm -rf "$out"
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  /usr/bin/time -v -o "$work/time.txt" "$@" >"$work/log" 2>&1 || rc=$?
  t1=$(date +%s.%N)
  if [[ $rc -ne 0 ]]; then
    echo "compare.sh: FAILED ($rc): $*" >&2
    tail -n 30 "$work/log" >&2
    exit 1
  fi
  "$PY" - "$model" "$variant" "$round" "$t0" "$t1" "$work/time.txt" "$out" "$work/log" >>"$results" <<'EOF'
import json, re, sys
model, variant, rnd, t0, t1, timef, out, log = sys.argv[1:]
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(timef).read()).group(1))
images, enc, ips = "", "", ""
try:  # ours and the peer both write their summary to OUT/_SUCCESS
    s = json.load(open(f"{out}/_SUCCESS"))
    images = s.get("encoded", s.get("images", ""))
    enc = s.get("busy_seconds", {}).get("encode", "")
    ips = s.get("images_per_second", "")
except FileNotFoundError:  # bench-encoder: one JSON line with images_per_second on stdout
    lines = [l for l in open(log) if '"images_per_second"' in l]
    if not lines:
        sys.exit(f"compare.sh: no _SUCCESS in {out} and no images_per_second line in the output")
    s = json.loads(lines[-1][lines[-1].index("{"):])
    images, ips = s.get("images", ""), s["images_per_second"]
wall = float(t1) - float(t0)
print(model, variant, rnd, f"{wall:.4f}", rss, images, enc, ips, sep="\t")
print(f"  {model:<9} {variant:<14} round {rnd}: {wall:7.2f} s  {rss / 1024:7.1f} MiB", file=sys.stderr)
EOF
}

ours_cmd() { # ours_cmd MODEL INPUT OUT: sets cmd=(our precompute command line)
  cmd=("$BIN" precompute --input "$2" --out "$3" --model "$1" --size "$SIZE"
    --threads "$THREADS" --batch-size "$BATCH" --overwrite)
}

if [[ $mode == rss ]]; then
  echo "== peak RSS of ours vs number of images (--threads $THREADS --batch-size $BATCH --size $SIZE)" >&2
  for n in "$SMALL" "$LARGE"; do jpeg_set "$n" >/dev/null; done
  for model in $MODELS; do
    for n in "$SMALL" "$LARGE"; do
      ours_cmd "$model" "$SET_ROOT/jpegs-$n" "$work/out"
      timed "$model" "ours-$n" 1 "$work/out" "${cmd[@]}"
    done
  done
  "$PY" - "$results" "$SMALL" "$LARGE" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
small, large = sys.argv[2], sys.argv[3]
print(f"\n| model | images | wall s | images/s | peak RSS MiB |\n|---|---:|---:|---:|---:|")
by = {}
for m, v, _, wall, rss, images, *_ in rows:
    n = v.split("-")[1]
    by[(m, n)] = int(rss) / 1024
    print(f"| {m} | {images} | {float(wall):.2f} | {int(images) / float(wall):.1f} | {int(rss) / 1024:.0f} |")
print()
for m in dict.fromkeys(r[0] for r in rows):
    a, b = by[(m, small)], by[(m, large)]
    flat = abs(b - a) <= max(0.10 * a, 32)
    ok = max(a, b) <= 1024
    print(f"{m}: {small} -> {large} images: {a:.0f} -> {b:.0f} MiB ({b - a:+.0f} MiB, x{b / a:.2f}); "
          f"<= 1 GiB: {'yes' if ok else 'NO'}; flat: {'yes' if flat else 'NO'}")
EOF
  exit 0
fi

set_dir=$(jpeg_set "$N")
has_bench_encoder=0
if "$BIN" bench-encoder --help >/dev/null 2>&1; then has_bench_encoder=1; fi
echo "== $N JPEGs ($set_dir), --size $SIZE, --threads $THREADS, --batch-size $BATCH, $ROUNDS round(s)" >&2

for model in $MODELS; do
  variants=(ours peer)
  [[ $DRAFT == 1 ]] && variants+=(peer-draft)
  [[ $model == taef2 && $ENCODER_ONLY == 1 && $has_bench_encoder == 1 ]] && variants+=(encoder-only)
  nv=${#variants[@]}
  for round in $(seq 1 "$ROUNDS"); do
    for i in $(seq 0 $((nv - 1))); do
      variant=${variants[$(((i + round - 1) % nv))]} # rotate the order each round
      out=$work/out-$model-$variant
      case $variant in
        ours)
          ours_cmd "$model" "$set_dir" "$out"
          timed "$model" ours "$round" "$out" "${cmd[@]}" ;;
        peer)
          timed "$model" peer "$round" "$out" "$PY" benches/reference_pipeline.py --input "$set_dir" \
            --out "$out" --model "$model" --size "$SIZE" --threads "$THREADS" --batch-size "$BATCH" ;;
        peer-draft)
          timed "$model" peer-draft "$round" "$out" "$PY" benches/reference_pipeline.py --input "$set_dir" \
            --out "$out" --model "$model" --size "$SIZE" --threads "$THREADS" --batch-size "$BATCH" \
            --draft --draft-gap "$DRAFT_GAP" ;;
        encoder-only)
          timed "$model" encoder-only "$round" "$out" "$BIN" bench-encoder --model "$model" --size "$SIZE" \
            --batch-size "$BATCH" --images "$N" --threads "$THREADS" ;;
      esac
    done
  done
done

"$PY" - "$results" "$work" "$N" "$DRAFT_GAP" "$has_bench_encoder" <<'EOF'
import glob, statistics, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq

results, work, n, gap, has_bench = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
rows = [l.rstrip("\n").split("\t") for l in open(results)]
label = {"ours": "ours", "peer": "peer", "peer-draft": f"peer --draft (gap {gap})", "encoder-only": "ours bench-encoder"}
models = list(dict.fromkeys(r[0] for r in rows))
verdicts = []
for m in models:
    runs = {}
    for _, v, _, wall, rss, images, enc, ips in (r for r in rows if r[0] == m):
        runs.setdefault(v, []).append((float(wall), int(rss), images, enc, ips))
    ours_wall = statistics.median(w for w, *_ in runs["ours"])
    print(f"\n### {m}: {n} images\n")
    print("| run | median wall s | images/s | peak RSS MiB | time / ours | walls s |")
    print("|---|---:|---:|---:|---:|---|")
    for v, rs in runs.items():
        wall = statistics.median(r[0] for r in rs)
        imgs = {r[2] for r in rs}
        if v != "encoder-only" and imgs != {str(n)}:
            sys.exit(f"compare.sh: {m} {v} encoded {sorted(imgs)} images, expected {n}")
        ratio = "" if v == "ours" else f"{wall / ours_wall:.2f}x"
        if v == "encoder-only":  # report its own rate: it may exclude session start-up
            rate = statistics.median(float(r[4]) for r in rs)
            ratio = ""
        else:
            rate = n / wall
        print(f"| {label[v]} | {wall:.2f} | {rate:.1f} | {max(r[1] for r in rs) / 1024:.0f} | {ratio} | "
              f"{', '.join(f'{r[0]:.2f}' for r in rs)} |")
    speed = statistics.median(w for w, *_ in runs["peer"]) / ours_wall
    target = {"avgpool8": 4.0, "taef2": 1.15}.get(m)
    if target:
        verdicts.append(f"{m}: peer/ours wall = {speed:.3f}x (target >= {target}x: {'met' if speed >= target else 'MISSED'})")
    if "peer-draft" in runs:
        verdicts.append(f"{m}: draft-peer/ours wall = {statistics.median(w for w, *_ in runs['peer-draft']) / ours_wall:.3f}x")
    if m == "taef2":
        # Like for like: our run's own images/s (_SUCCESS, counted after the session is open)
        # against the encoder alone; the wall-clock rate (process start to exit) is shown too.
        e2e = statistics.median(float(r[4]) for r in runs["ours"])
        if "encoder-only" in runs:
            enc_rate = statistics.median(float(r[4]) for r in runs["encoder-only"])
            src = "bench-encoder"
        else:
            enc_s = statistics.median(float(r[3]) for r in runs["ours"])
            enc_rate = n / enc_s
            src = "busy_seconds.encode of our runs (no bench-encoder subcommand)"
        r = e2e / enc_rate
        verdicts.append(f"taef2: ours end-to-end {e2e:.2f} images/s (_SUCCESS; {n / ours_wall:.2f} by wall clock) / "
                        f"encoder-only {enc_rate:.2f} images/s [{src}] = {r:.3f} (target >= 0.90: {'met' if r >= 0.90 else 'MISSED'})")

# The peer computes the same thing: compare the last round's latents with ours.
def load(d):
    files = sorted(glob.glob(f"{d}/*/part-*.parquet"))
    t = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("key")
    return t.column("key").to_pylist(), t.column("latent").combine_chunks().to_numpy_ndarray().astype(np.float32)
print()
for m in models:
    k0, l0 = load(f"{work}/out-{m}-ours")
    for v in ("peer", "peer-draft"):
        if not glob.glob(f"{work}/out-{m}-{v}/*/part-*.parquet"):
            continue
        k1, l1 = load(f"{work}/out-{m}-{v}")
        if k0 != k1 or l0.shape != l1.shape:
            sys.exit(f"compare.sh: {m} {v}: keys or latent shapes differ from ours ({l0.shape} vs {l1.shape})")
        d = np.abs(l0 - l1)
        print(f"agreement {m} {label[v]} vs ours: shape {l0.shape[1:]}, max|diff| {d.max():.4f}, "
              f"mean|diff| {d.mean():.5f} (max|latent| {np.abs(l0).max():.3f})")
print()
for v in verdicts:
    print(v)
EOF
