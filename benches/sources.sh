#!/usr/bin/env bash
# The same N JPEGs (make_jpeg_set.py) three ways: a folder, WebDataset tars of 100 samples and one
# Parquet file with a Hugging Face Image column (100-row row groups), each precomputed with
# avgpool8 at 256² (decode-bound, so the source's cost shows), and the tars again from a local S3
# endpoint (moto_server on loopback): images/s and peak RSS, one Markdown row per source. Nothing
# here asserts a time.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1200}
BIN=${BIN:-target/release/vae-pipeline}
PY=${PY:-.venv/bin/python}
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.ort/libonnxruntime.so.1.31.1}
SET_ROOT=${SET_ROOT:-target/bench}
jpegs=$SET_ROOT/jpegs-$N
$PY benches/make_jpeg_set.py "$jpegs" "$N" >/dev/null
work=$SET_ROOT/sources-$N
mkdir -p "$work/tars"
$PY - "$jpegs" "$work" <<'PY'
import sys, tarfile
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
src, work = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(src.glob("*.jpg"))
for shard in range(0, len(files), 100):
    path = work / "tars" / f"{shard // 100:05d}.tar"
    if not path.exists():
        with tarfile.open(path, "w") as tar:
            for f in files[shard:shard + 100]:
                tar.add(f, arcname=f.name)
pq_path = work / "images.parquet"
if not pq_path.exists():
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    with pq.ParquetWriter(pq_path, pa.schema([("key", pa.string()), ("image", image)])) as w:
        for shard in range(0, len(files), 100):
            part = files[shard:shard + 100]
            w.write_table(pa.table({"key": [f.stem for f in part],
                                    "image": pa.array([{"bytes": f.read_bytes(), "path": f.name} for f in part], image)}))
PY
port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$(dirname "$PY")/moto_server" -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null' EXIT
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 \
  AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ALLOW_HTTP=true
$PY - "$work/tars" <<'PY'
import sys, time, boto3
from pathlib import Path
for _ in range(100):
    try:
        s3 = boto3.client("s3"); s3.create_bucket(Bucket="bench"); break
    except Exception:
        time.sleep(0.1)
for tar in sorted(Path(sys.argv[1]).glob("*.tar")):
    s3.upload_file(str(tar), "bench", f"tars/{tar.name}")
PY
echo "| source | images | seconds | images/s | peak RSS (MiB) |"
echo "|---|---|---|---|---|"
for spec in "folder:$jpegs" "tars:$work/tars/*.tar" "parquet:$work/images.parquet" "tars on S3 (moto):s3://bench/tars/*.tar"; do
  name=${spec%%:*}; input=${spec#*:}
  rm -rf "$work/out"
  /usr/bin/time -f "%e %M" -o "$work/time" "$BIN" precompute --input "$input" --out "$work/out" \
    --model models/avgpool8.toml --size 256 2>/dev/null
  read -r secs kib < "$work/time"
  awk -v n="$name" -v c="$N" -v s="$secs" -v k="$kib" \
    'BEGIN {printf "| %s | %d | %.2f | %.0f | %.0f |\n", n, c, s, c / s, k / 1024}'
done
