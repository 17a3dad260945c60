#!/usr/bin/env bash
# GPU device check and sweep (issues 5 and 22): one run prints one table, ending with
# `sweep done: N rows`. Nothing here asserts a time.
#
#   On the lent GPU (after benches/gpu/prepare.sh here; carry [".ortgpu"], timeout 600):
#     bash benches/gpu/device_check.sh
#   Here, at small sizes, in a few minutes (rows that need torch or a GPU say so):
#     DEVICE=cpu bash benches/gpu/device_check.sh
#   SECTIONS picks parts (default all: "knobs batch peers sd e2e"), to fit one call's 600 s.
#
# Rows: bench-encoder (encoder alone, input resident | host path) for TAEF2 fp16 over every
# CUDA knob (nhwc, algo, fuse_conv_bias, cuda_graph, sessions; fp32: tf32) and batch 8-64; random-weight
# SDXL and FLUX.2 VAE encoders (benches/gpu/vae_checkpoint.py, exported here) at 512²/1024² in
# f16/f32; the PyTorch peers on the same graphs (fp16/bf16, channels_last, torch.compile); end to
# end precompute vs a torch DataLoader peer, with the busy line and SM utilization (nvidia-smi
# dmon). Full logs and JSON lines go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/device-check}
D=$OUT/runs
mkdir -p "$OUT" "$D"
exec > >(tee "$OUT/device_check.log") 2>&1
TSV=$OUT/sweep.tsv
printf 'section\tmodel\tsize\tbatch\tsetting\tencoder img/s\thost img/s\tnote\n' >"$TSV"
SECTIONS=" ${SECTIONS:-knobs batch peers sd e2e} "
want() { [[ $SECTIONS == *" $1 "* ]]; }
step() { echo; echo "== $*"; }
# label PATH: a row's model name (sdxl-f16 for .../sdxl/f16/card.toml, taef2 for taef2).
label() {
  case $1 in
  */card.toml | */encoder.onnx) echo "$(basename "$(dirname "$(dirname "$1")")")-$(basename "$(dirname "$1")")" ;;
  *) basename "$(basename "$1" .toml)" .onnx ;;
  esac
}
row() { local IFS=$'\t'; echo "$*" >>"$TSV"; }
# ips FILE KEY...: the KEYs of the last JSON line in FILE, rounded ("-" for null).
ips() {
  $PY - "$@" <<'PY'
import json, sys
j = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(" ".join("-" if j[k] is None else "%.0f" % j[k] for k in sys.argv[2:]))
PY
}

if [[ $DEVICE == cpu ]]; then
  BIN=${BIN:-target/release/vae-pipeline}
  PY=${VAE_PIPELINE_PYTHON:-python3}
  SIZES=(64) SD_SIZES=(64) BATCHES=(2 4) IMAGES=8 SD_IMAGES=4 E2E_IMAGES=16 E2E_SIZES=(64) SD_LIMIT=8
  SD_SHRINK=1 THREADS=${THREADS:-2} SPEC=cpu
  MODELS=(taef2 taef2-fp16)
else
  step "unpack ONNX Runtime CUDA bundle, binary, models"
  mkdir -p /tmp/ortgpu && xz -dc .ortgpu/ortgpu_sm90.tar.xz | tar x -C /tmp/ortgpu
  xz -dc .ortgpu/vae-pipeline.xz >/tmp/vae-pipeline && chmod +x /tmp/vae-pipeline
  mkdir -p models/onnx
  xz -dc .ortgpu/taef2_encoder_fp16.onnx.xz >models/onnx/taef2_encoder_fp16.onnx
  PY=${PY:-python3}
  $PY benches/gpu/upcast_onnx.py models/onnx/taef2_encoder_fp16.onnx models/onnx/taef2_encoder.onnx
  SP=$($PY -c 'import site;print(site.getsitepackages()[0])')
  lib() { dirname "$(find "$SP/nvidia" -name "$1" | head -1)"; }
  export LD_LIBRARY_PATH="$(lib 'libcudart.so.13*'):$(lib 'libcudnn.so.9*'):$(lib 'libcublasLt.so.13*'):${LD_LIBRARY_PATH:-}"
  export ORT_DYLIB_PATH=/tmp/ortgpu/libonnxruntime.so.1.31.1
  BIN=/tmp/vae-pipeline
  SIZES=(256 512) SD_SIZES=(512 1024) BATCHES=(8 16 32 64) IMAGES=${IMAGES:-640} SD_IMAGES=${SD_IMAGES:-32}
  E2E_IMAGES=${E2E_IMAGES:-1200} E2E_SIZES=(256 512) SD_SHRINK=0 THREADS=$(nproc) SPEC=cuda:0 SD_LIMIT=${SD_LIMIT:-160}
  MODELS=(taef2 taef2-fp16)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
fi
nproc
HAS_TORCH=0
if [[ $DEVICE != cpu ]] && $PY -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then HAS_TORCH=1; fi

# bench SECTION MODEL SIZE BATCH SETTING: one bench-encoder row (SETTING: --device suffix items).
bench() {
  local section=$1 model=$2 size=$3 batch=$4 setting=$5 spec=$SPEC
  if [[ $DEVICE == cpu && $setting != default ]]; then
    row "$section" "$(label "$model")" "$size" "$batch" "$setting" "-" "-" "needs a GPU"
    return
  fi
  [[ $setting != default ]] && spec="$SPEC,$setting"
  local log=$D/bench-$section-$(basename "$model" .toml)-$size-$batch-${setting//[=,]/_}
  if $BIN bench-encoder --model "$model" --size "$size" --batch-size "$batch" --images "${N:-$IMAGES}" \
    --device "$spec" --threads "$([[ $DEVICE == cpu ]] && echo "$THREADS" || echo 1)" >"$log.json" 2>"$log.err"; then
    cat "$log.json" >>"$OUT/encoder.jsonl"
    read -r enc host < <(ips "$log.json" encoder_images_per_second images_per_second)
    row "$section" "$(label "$model")" "$size" "$batch" "$setting" "$enc" "$host" ""
  else
    row "$section" "$(label "$model")" "$size" "$batch" "$setting" "-" "-" "failed: $(tail -c 200 "$log.err" | tr '\t\n' '  ')"
  fi
}

# peer SECTION ONNX SIZE BATCH ARGS...: one torch_peer.py row.
peer() {
  local section=$1 onnx=$2 size=$3 batch=$4
  shift 4
  local setting="torch $*"
  if [[ $HAS_TORCH == 0 ]]; then
    row "$section" "$(label "$onnx")" "$size" "$batch" "$setting" "-" "-" "needs torch on a GPU"
    return
  fi
  local log=$D/peer-$section-$size-$batch-$(echo "$*" | tr ' -' '__')
  if (cd benches/gpu && $PY torch_peer.py "$OLDPWD/$onnx" --size "$size" --batch-size "$batch" --images "${N:-$IMAGES}" "$@") >"$log.json" 2>"$log.err"; then
    cat "$log.json" >>"$OUT/torch.jsonl"
    row "$section" "$(label "$onnx")" "$size" "$batch" "$setting" "$(ips "$log.json" images_per_second)" "-" ""
  else
    row "$section" "$(label "$onnx")" "$size" "$batch" "$setting" "-" "-" "failed: $(tail -c 200 "$log.err" | tr '\t\n' '  ')"
  fi
}

B=${BATCHES[-2]}
want knobs && step "TAEF2: every CUDA knob at ${SIZES[0]}², batch $B (fp32 also with tf32=0); other sizes at the defaults"
# The knobs on the fp16 model (the fast path); fp32 at the defaults and with tf32=0.
want knobs && for setting in default nhwc=0 algo=exhaustive fuse_conv_bias=1 cuda_graph=1 sessions=1; do
  bench knobs taef2-fp16 "${SIZES[0]}" "$B" "$setting"
done
want knobs && for setting in default tf32=0; do bench knobs taef2 "${SIZES[0]}" "$B" "$setting"; done
want knobs && for model in "${MODELS[@]}"; do
  for size in "${SIZES[@]:1}"; do bench knobs "$model" "$size" "$B" default; done
done

want batch && step "TAEF2 fp16: batch sizes"
want batch && for batch in "${BATCHES[@]}"; do bench batch taef2-fp16 "${SIZES[0]}" "$batch" default; done

want peers && step "TAEF2: PyTorch peers on the same graph"
want peers && for args in "--dtype fp16" "--dtype fp16 --channels-last" "--dtype bf16 --channels-last" "--dtype fp16 --channels-last --compile"; do
  # shellcheck disable=SC2086
  peer peers models/onnx/taef2_encoder.onnx "${SIZES[0]}" "$B" $args
done
want peers && for size in "${SIZES[@]:1}"; do peer peers models/onnx/taef2_encoder.onnx "$size" "$B" --dtype fp16 --channels-last; done

SD=/tmp/device-check-sd
want sd || want e2e && step "SD-class encoders: random-weight SDXL and FLUX.2 VAEs, exported here"
want sd || want e2e && for preset in sdxl flux2; do
  ck=$SD/$preset  # not under $OUT: full-size checkpoints are hundreds of MB
  ! want sd && [[ $preset == flux2 ]] && continue
  [[ -s $ck/f32/card.toml ]] && ! want sd && continue
  if [[ $SD_SHRINK == 1 ]]; then
    $PY - "$preset" "$ck/vae" <<'PY'
import sys
sys.path.insert(0, "benches/gpu")
from vae_checkpoint import PRESETS, write
cfg = {**PRESETS[sys.argv[1]], "block_out_channels": [32, 64], "layers_per_block": 1,
       "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
write(cfg, __import__("pathlib").Path(sys.argv[2]))
PY
  else
    $PY benches/gpu/vae_checkpoint.py "$preset" "$ck/vae"
  fi
  for dtype in f16 f32; do
    if ! $BIN export --checkpoint "$ck/vae" --out "$ck/$dtype" --dtype "$dtype" >"$ck-$dtype-export.log" 2>&1; then
      row sd "$preset-$dtype" - - "export" - - "export failed: $(tail -c 200 "$ck-$dtype-export.log" | tr '\t\n' '  ')"
      continue
    fi
    want sd && for size in "${SD_SIZES[@]}"; do
      sd_batch=$([[ $size -ge 1024 ]] && echo 4 || echo 8)
      [[ $DEVICE == cpu ]] && sd_batch=2
      N=$SD_IMAGES bench sd "$ck/$dtype/card.toml" "$size" "$sd_batch" default
      [[ $dtype == f16 && $size == "${SD_SIZES[0]}" ]] && N=$SD_IMAGES bench sd "$ck/$dtype/card.toml" "$size" "$sd_batch" algo=exhaustive
      [[ $dtype == f32 ]] && N=$SD_IMAGES peer sd "$ck/f32/encoder.onnx" "$size" "$sd_batch" --dtype fp16 --channels-last
      [[ $dtype == f32 && $size == "${SD_SIZES[0]}" ]] && N=$SD_IMAGES peer sd "$ck/f32/encoder.onnx" "$size" "$sd_batch" --dtype bf16 --channels-last
    done
  done
done

JPEGS=/tmp/device-check-jpegs-$E2E_IMAGES
want e2e && step "generate $E2E_IMAGES JPEGs (1024x768, q90)"
want e2e && $PY - "$E2E_IMAGES" "$JPEGS" <<'PY'
import os, sys
from multiprocessing import Pool
import numpy as np
from PIL import Image
n, root = int(sys.argv[1]), sys.argv[2]
y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
def make(i):
    path = f"{root}/{i:06d}.jpg"
    if os.path.exists(path):
        return
    rng = np.random.default_rng(i)
    a, b, c = rng.uniform(0.002, 0.03, 3)
    img = np.stack([np.sin(x * a + i), np.cos(y * b - i), np.sin((x + y) * c)], -1) * 100 + 128
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
os.makedirs(root, exist_ok=True)
with Pool() as pool:
    pool.map(make, range(n), chunksize=16)
PY

want e2e && step "end to end: precompute vs the torch DataLoader peer, busy line and SM utilization"
# e2e LABEL CARD SIZE BATCH [ONNX_FOR_PEER RANGE]; LIMIT=N encodes the first N images only.
e2e() {
  local label=$1 card=$2 size=$3 batch=$4
  local log=$D/e2e-$label-$size
  rm -rf /tmp/device-check-e2e
  local dmon=""
  if command -v nvidia-smi >/dev/null && [[ $DEVICE != cpu ]]; then
    nvidia-smi dmon -s u -d 1 >"$log.dmon" 2>&1 &
    dmon=$!
  fi
  if $BIN precompute --input "$JPEGS" --out /tmp/device-check-e2e --model "$card" --size "$size" \
    --device "$SPEC" --batch-size "$batch" --threads "$THREADS" --limit "${LIMIT:-0}" --overwrite 2>"$log.err" >/dev/null; then
    local ips busy sm="-"
    ips=$(grep -oE '[0-9.]+ images/s' "$log.err" | tail -1)
    busy=$(grep -E '^busy' "$log.err" | tail -1 | tr '\t' ' ')
    [[ -n $dmon ]] && { kill "$dmon" 2>/dev/null; wait "$dmon" 2>/dev/null
      sm=$(awk '$1 ~ /^[0-9]+$/ {n++; s+=$2} END {if (n) printf "%.0f%%", s/n}' "$log.dmon"); }
    row e2e "$label" "$size" "$batch" "precompute" "-" "${ips% images/s}" "SM ${sm}; $busy"
  else
    [[ -n $dmon ]] && kill "$dmon" 2>/dev/null
    row e2e "$label" "$size" "$batch" "precompute" "-" "-" "failed: $(tail -c 200 "$log.err" | tr '\t\n' '  ')"
  fi
  if [[ $# -ge 6 ]]; then
    if [[ $HAS_TORCH == 0 ]]; then
      row e2e "$label" "$size" "$batch" "torch DataLoader" "-" "-" "needs torch on a GPU"
    elif (cd benches/gpu && $PY torch_e2e.py "$OLDPWD/$5" "$JPEGS" /tmp/device-check-e2e-torch --size "$size" \
        --batch-size "$batch" --workers "$THREADS" --dtype fp16 --channels-last --range "$6") >"$log-torch.json" 2>"$log-torch.err"; then
      row e2e "$label" "$size" "$batch" "torch DataLoader" "-" "$(ips "$log-torch.json" images_per_second)" ""
    else
      row e2e "$label" "$size" "$batch" "torch DataLoader" "-" "-" "failed: $(tail -c 200 "$log-torch.err" | tr '\t\n' '  ')"
    fi
  fi
}
want e2e && for size in "${E2E_SIZES[@]}"; do
  e2e taef2-fp16 taef2-fp16 "$size" "$B" models/onnx/taef2_encoder.onnx 0,1
  e2e taef2 taef2 "$size" "$B"
done
want e2e && for size in "${SD_SIZES[@]}"; do
  sd_batch=$([[ $size -ge 1024 ]] && echo 4 || echo 8)
  [[ $DEVICE == cpu ]] && sd_batch=2
  LIMIT=$SD_LIMIT e2e sdxl-f16 $SD/sdxl/f16/card.toml "$size" "$sd_batch" $SD/sdxl/f32/encoder.onnx -1,1
done

echo "GroupNorm as one op (GroupNormalization-21 / com.microsoft.GroupNorm): not built yet; the exports use Reshape -> InstanceNormalization -> Reshape -> Mul -> Add" | tee -a "$OUT/notes.txt"
tar czf "$OUT/runs.tgz" -C "$OUT" runs && rm -r "$D"
echo
column -t -s $'\t' "$TSV"
echo "sweep done: $(($(wc -l <"$TSV") - 1)) rows"
