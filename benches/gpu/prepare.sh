#!/usr/bin/env bash
# Fills .ortgpu/ (ignored) with what benches/gpu/device_check.sh needs on the GPU machine, within
# the device tool's 64 MiB carry limit: the ONNX Runtime CUDA bundle from ../shared/gpu, the
# release binary built here (stripped, xz) and the fp16 TAEF2 encoder (the fp32 one is made
# from it there). Then: device run `bash benches/gpu/device_check.sh` with carry [".ortgpu"].
set -euo pipefail
cd "$(dirname "$0")/../.."
shared=${SHARED:-../shared}
test -x target/release/vae-pipeline || { echo "build first: make build" >&2; exit 1; }
mkdir -p .ortgpu
cp -u "$shared/gpu/ortgpu_sm90.tar.xz" .ortgpu/
strip -o .ortgpu/vae-pipeline target/release/vae-pipeline
xz -T2 -6 -f .ortgpu/vae-pipeline
cp -u models/onnx/taef2_encoder_fp16.onnx .ortgpu/
du -cb .ortgpu/* | tail -1 | awk '{printf "carry .ortgpu: %.1f MiB (limit 64 MiB with the working tree)\n", $1/1048576}'
