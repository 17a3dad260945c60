#!/usr/bin/env bash
# GPU device check (issue 5), for the lent H100/H200 machine. Prepare here with
# benches/gpu/prepare.sh, then run there from the repo root with .ortgpu carried. Prints and
# writes to $OUT: nvidia-smi, encoder-only images/s (TAEF2 fp32 and fp16, 256² and 512²),
# end-to-end precompute images/s on generated JPEGs with GPU utilization (nvidia-smi dmon), and
# the PyTorch fp16 peer on the same graph. Nothing here asserts a time.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/device-check}
# The device tool returns at most 8 files: the log and the JSON lines stay on top, the per-run
# dmon and time outputs go in $D and are tarred at the end.
D=$OUT/runs
mkdir -p "$OUT" "$D"
exec > >(tee "$OUT/device_check.log") 2>&1
IMAGES=${IMAGES:-2048}
E2E_IMAGES=${E2E_IMAGES:-3000}
step() { echo; echo "== $*"; }

step "unpack ONNX Runtime CUDA bundle, binary, models"
mkdir -p /tmp/ortgpu && xz -dc .ortgpu/ortgpu_sm90.tar.xz | tar x -C /tmp/ortgpu
xz -dc .ortgpu/vae-pipeline.xz > /tmp/vae-pipeline && chmod +x /tmp/vae-pipeline
mkdir -p models/onnx
xz -dc .ortgpu/taef2_encoder_fp16.onnx.xz > models/onnx/taef2_encoder_fp16.onnx
python3 benches/gpu/upcast_onnx.py models/onnx/taef2_encoder_fp16.onnx models/onnx/taef2_encoder.onnx
SP=$(python3 -c 'import site;print(site.getsitepackages()[0])')
lib() { dirname "$(find "$SP/nvidia" -name "$1" | head -1)"; }
export LD_LIBRARY_PATH="$(lib 'libcudart.so.13*'):$(lib 'libcudnn.so.9*'):$(lib 'libcublasLt.so.13*'):${LD_LIBRARY_PATH:-}"
export ORT_DYLIB_PATH=/tmp/ortgpu/libonnxruntime.so.1.31.1
BIN=/tmp/vae-pipeline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nproc

step "encoder only (bench-encoder), batch 32"
for model in taef2 taef2-fp16; do
  for size in 256 512; do
    $BIN bench-encoder --model $model --size $size --batch-size 32 --images $IMAGES --device cuda \
      | tee -a "$OUT/encoder.jsonl"
  done
done
$BIN bench-encoder --model taef2-fp16 --size 256 --batch-size 64 --images $IMAGES --device cuda | tee -a "$OUT/encoder.jsonl"

step "generate $E2E_IMAGES JPEGs (1024x768, q90)"
python3 - "$E2E_IMAGES" <<'PY'
import sys, os, numpy as np
from multiprocessing import Pool
from PIL import Image
y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
def make(i):
    rng = np.random.default_rng(i)
    a, b, c = rng.uniform(0.002, 0.03, 3)
    img = np.stack([np.sin(x * a + i), np.cos(y * b - i), np.sin((x + y) * c)], -1) * 100 + 128
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(f"/tmp/jpegs/{i:06d}.jpg", quality=90)
os.makedirs("/tmp/jpegs", exist_ok=True)
with Pool() as pool:
    pool.map(make, range(int(sys.argv[1])), chunksize=16)
PY

step "end to end (precompute --device cuda), GPU utilization from nvidia-smi dmon"
for model in taef2 taef2-fp16; do
  for size in 256 512; do
    rm -rf /tmp/e2e
    nvidia-smi dmon -s u -d 1 > "$D/dmon-$model-$size.txt" 2>&1 &
    dmon=$!
    /usr/bin/time -v $BIN precompute --input /tmp/jpegs --out /tmp/e2e --model $model --size $size \
      --device cuda --batch-size 32 --threads "$(nproc)" 2> "$D/e2e-$model-$size.txt"
    kill $dmon 2>/dev/null
    grep -E "encoded|busy|Maximum resident" "$D/e2e-$model-$size.txt"
    awk '$1 ~ /^[0-9]+$/ {n++; s+=$2} END {if (n) printf "GPU SM utilization: mean %.0f%% over %d samples\n", s/n, n}' "$D/dmon-$model-$size.txt"
  done
done

step "PyTorch fp16 peer on the same TAEF2 graph"
for size in 256 512; do
  python3 benches/gpu/torch_peer.py models/onnx/taef2_encoder.onnx --size $size --batch-size 32 --images $IMAGES \
    | tee -a "$OUT/torch.jsonl"
done
python3 benches/gpu/torch_peer.py models/onnx/taef2_encoder.onnx --size 256 --batch-size 32 --images $IMAGES --compile \
  | tee -a "$OUT/torch.jsonl"
tar czf "$OUT/runs.tgz" -C "$OUT" runs && rm -r "$D"
echo; echo "done"
