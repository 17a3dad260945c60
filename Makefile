# vae-pipeline: `make demo` runs the main job on real images, `make test` runs every test.
# Both install what they need first (`make setup`): the ONNX Runtime library from the PyPI
# wheel into .ort/, the Python reference packages into .venv/, the shared models into models/onnx/.

SHARED      ?= ../shared
ORT_VERSION := 1.31.1
ORT_LIB     := .ort/libonnxruntime.so.$(ORT_VERSION)
VENV        := .venv
PY          := $(VENV)/bin/python
BIN         := target/release/vae-pipeline
CARGO_FLAGS := --release --locked
DEMO_OUT    := demo-out/kodak-taef2-256

export ORT_DYLIB_PATH := $(abspath $(ORT_LIB))
export VAE_PIPELINE_PYTHON := $(abspath $(PY))

.PHONY: setup build models build-tools chromium demo dataset test test-cluster wheel bench gpu-check-prepare fuzz fmt lint clean

setup: build-tools $(ORT_LIB) $(VENV)/.installed models chromium

# libjpeg-turbo is built from source by the turbojpeg crate: it needs cmake and nasm (Debian).
# The FFmpeg plugin (ffmpeg/) links FFmpeg's libraries through ffmpeg-sys-next, whose bindgen needs
# clang and pkg-config; the tests make their clips with the ffmpeg CLI (Debian 12: FFmpeg 5.1).
FFMPEG_DEBS := libavcodec-dev libavformat-dev libswscale-dev clang libclang-dev pkg-config ffmpeg
build-tools:
	@command -v cmake >/dev/null && command -v nasm >/dev/null || \
	  { apt-get update && apt-get install -y --no-install-recommends cmake nasm; }
	@dpkg -s $(FFMPEG_DEBS) >/dev/null 2>&1 || \
	  { apt-get update && apt-get install -y --no-install-recommends $(FFMPEG_DEBS); }

$(ORT_LIB):
	mkdir -p .ort
	python3 -m pip download --quiet --no-deps --only-binary=:all: onnxruntime==$(ORT_VERSION) -d .ort
	python3 -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('.ort/onnxruntime-$(ORT_VERSION)-*.whl')[0]); \
	  open('$(ORT_LIB)', 'wb').write(z.read('onnxruntime/capi/libonnxruntime.so.$(ORT_VERSION)'))"
	rm -f .ort/onnxruntime-*.whl

$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r tests/requirements.txt
	touch $@

# The report test renders report.html in a real headless browser: Debian's chromium.
chromium:
	@test -x /usr/bin/chromium || { apt-get update && apt-get install -y --no-install-recommends chromium; }

# ONNX weights are never committed: copy the shared test models, or say how to get them.
models:
	@if [ -d "$(SHARED)/models" ]; then \
	  mkdir -p models/onnx && cp -u $(SHARED)/models/*.onnx models/onnx/ && echo "models/onnx/ filled from $(SHARED)/models"; \
	else \
	  echo "$(SHARED)/models not found: the shipped cards for taef2, taef2-fp16, tiny-kl and avgpool8 need its ONNX files."; \
	  echo "Put them in models/onnx/, or see docs/models.md 'Use your own VAE'."; exit 1; \
	fi

build:
	cargo build $(CARGO_FLAGS)

demo: setup build
	rm -rf $(DEMO_OUT)
	time $(BIN) precompute --pipeline pipelines/taef2-256-demo.toml --input $(SHARED)/data/kodak --out $(DEMO_OUT)
	$(PY) -c "import pyarrow.parquet as pq, glob; \
	  t = pq.read_table(sorted(glob.glob('$(DEMO_OUT)/*/*.parquet'))); a = t.column('latent').combine_chunks(); \
	  print(f'pyarrow reads {t.num_rows} rows; latent {a.type}; array {a.to_numpy_ndarray().shape}')"

# A dataset build as make stages (docs/images.md "Dataset builds with make"): precompute -> verify ->
# report, each rebuilt only when what it depends on changed.
DATASET_IMAGES   ?= $(SHARED)/data/kodak
DATASET_OUT      ?= demo-out/dataset
DATASET_PIPELINE ?= pipelines/taef2-256-demo.toml
DATASET_FILES    := $(shell find $(DATASET_IMAGES) -type f 2>/dev/null)

dataset: $(DATASET_OUT)/report/summary.json

$(DATASET_OUT)/shards/_SUCCESS: $(DATASET_FILES) $(DATASET_PIPELINE) | $(BIN)
	$(BIN) precompute --pipeline $(DATASET_PIPELINE) --input $(DATASET_IMAGES) --out $(DATASET_OUT)/shards --max-failures 0.01

$(DATASET_OUT)/shards/.verified: $(DATASET_OUT)/shards/_SUCCESS
	$(BIN) verify $(DATASET_OUT)/shards && touch $@

$(DATASET_OUT)/report/summary.json: $(DATASET_OUT)/shards/.verified
	$(BIN) report --shards $(DATASET_OUT)/shards --input $(DATASET_IMAGES) --model taef2 --out $(DATASET_OUT)/report

$(BIN):
	cargo build $(CARGO_FLAGS)

# The wheel for `pip install`: maturin links the same release build (`cargo test` built it
# already, so only the binary is relinked, stripped), the shipped cards travel as wheel data
# into <prefix>/share/vae-pipeline/models. Platform tag: see docs/install.md "Install with pip".
# The FFmpeg plugin (ffmpeg/) is not in the wheel: it links FFmpeg's libraries, which no
# manylinux wheel may need from the system (auditwheel would tag it linux_x86_64); the binary does
# not link them, so the wheel encodes images anywhere and clips say what to build (docs: video).
WHEEL_DATA := target/wheel-data/data/share/vae-pipeline/models
wheel: $(VENV)/.installed
	rm -rf target/wheel-data target/wheels && mkdir -p $(WHEEL_DATA)
	cp models/*.toml $(WHEEL_DATA)/
	$(VENV)/bin/maturin build --release --locked --compatibility manylinux_2_34 --out target/wheels

# `cargo test` builds the release binary too (one build, one profile) for the Python tests; the
# wheel reuses it, and the Python tests install it into a fresh venv.
test: setup
	cargo test $(CARGO_FLAGS)
	# `cargo test` builds the FFmpeg plugin's tests, not its cdylib: the clip tests load it.
	cargo build $(CARGO_FLAGS) -p vae-pipeline-ffmpeg
	$(MAKE) wheel
	VAE_PIPELINE_BIN=$(abspath $(BIN)) $(PY) -m pytest tests/python -q

# Many machines (docs/many-machines.md): the Slurm sbatch scripts on real single-node Slurm
# daemons (Debian slurm-wlm + munge, started and stopped by the test), the Kubernetes Job's worker
# environment, and the Ray launcher on a local Ray cluster (its own venv: Ray is a 540 MB install).
RAY_VENV := .venv-ray
test-cluster: setup build $(RAY_VENV)/.installed
	bash tests/cluster/install_slurm.sh
	VAE_PIPELINE_BIN=$(abspath $(BIN)) $(PY) -m pytest tests/cluster --ignore=tests/cluster/ray -q
	VAE_PIPELINE_BIN=$(abspath $(BIN)) $(RAY_VENV)/bin/python -m pytest tests/cluster/ray -q

$(RAY_VENV)/.installed: tests/cluster/ray/requirements.txt
	python3 -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/python -m pip install --quiet -r tests/cluster/ray/requirements.txt
	touch $@

# Ours vs the Python peer (benches/reference_pipeline.py) on generated JPEGs, peak RSS at 200 vs
# 2000 images, the threads x batch-size table, the peak RSS of a prune, then the per-stage
# criterion benchmarks.
bench: setup build
	benches/compare.sh
	benches/compare.sh --rss
	benches/scaling.sh
	$(PY) benches/prune_rss.py $(BIN) models/avgpool8.toml 1500
	cargo bench --locked --bench stages

# The GPU device check (benches/gpu/device_check.sh) needs .ortgpu/ filled first.
gpu-check-prepare: build
	benches/gpu/prepare.sh

# Fuzz the decode stage (bytes in -> image or typed refusal) with libFuzzer: `cargo install
# cargo-fuzz` once; RUSTC_BOOTSTRAP lets the stable toolchain build the sanitizer flags.
FUZZ_SECONDS ?= 600
fuzz:
	mkdir -p fuzz/corpus/decode && cp -n fuzz/seeds/* fuzz/corpus/decode/
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode --release -- \
	  -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -malloc_limit_mb=1024

fmt:
	cargo fmt

lint:
	cargo fmt --check
	cargo clippy $(CARGO_FLAGS) --all-targets -- -D warnings

clean:
	rm -rf target .ort $(VENV) models/onnx demo-out
