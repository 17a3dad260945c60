#!/usr/bin/env bash
# End-to-end throughput of `precompute` at --size 256 on the Kodak set repeated to COPIES×24
# images: TAEF2 (a real encoder) and avgpool8 (a cost-free one: the pipeline's own overhead).
# Usage: benches/end_to_end.sh [COPIES]   (run from the repo after `make build`)
set -euo pipefail
cd "$(dirname "$0")/.."
copies=${1:-8}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for c in $(seq 1 "$copies"); do
  mkdir -p "$work/in/copy$c"
  for f in ../shared/data/kodak/*.png; do ln -s "$(realpath "$f")" "$work/in/copy$c/"; done
done
for model in taef2 avgpool8; do
  echo "== $model, $((copies * 24)) images, --size 256"
  target/release/vae-pipeline precompute --input "$work/in" --out "$work/out-$model" --model "$model" --size 256
done
