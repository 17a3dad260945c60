#!/usr/bin/env bash
# Fills .ortgpu/ (ignored) with what benches/gpu/device_check.sh needs on the GPU machine, within
# the device tool's 64 MiB carry limit (working tree included): the ONNX Runtime CUDA bundle from
# ../shared/gpu, the release binary built here and the fp16 TAEF2 encoder (both stripped or xz'd;
# the fp32 encoder is made from the fp16 one there). Then: device run `bash benches/gpu/device_check.sh` with carry [".ortgpu"].
set -euo pipefail
cd "$(dirname "$0")/../.."
shared=${SHARED:-../shared}
bin=${DEVICE_BIN:-target/release/vae-pipeline}
test -x "$bin" || { echo "build first: $bin is missing (see the comment at the top)" >&2; exit 1; }
mkdir -p .ortgpu
# Recompressed with xz's x86 filter (1.5 MB smaller than the shared bundle; a few minutes, once).
if [ ! -s .ortgpu/ortgpu_sm90.tar.xz ]; then
  xz -dc "$shared/gpu/ortgpu_sm90.tar.xz" | xz --x86 --lzma2=preset=9e,dict=192MiB -T1 \
    > .ortgpu/ortgpu_sm90.tar.xz.tmp && mv .ortgpu/ortgpu_sm90.tar.xz.tmp .ortgpu/ortgpu_sm90.tar.xz
fi
strip -o .ortgpu/vae-pipeline "$bin"
xz --x86 --lzma2=preset=9e -T1 -f .ortgpu/vae-pipeline
xz -9e -c models/onnx/taef2_encoder_fp16.onnx > .ortgpu/taef2_encoder_fp16.onnx.xz
carry=$(du -cb .ortgpu/* | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
awk -v c="$carry" -v t="$tree" 'BEGIN {printf "carry .ortgpu %.2f MiB + working tree %.2f MiB = %.2f MiB (limit 64)\n", c/1048576, t/1048576, (c+t)/1048576; exit (c+t > 64*1048576)}'
