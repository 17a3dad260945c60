//! Finding and loading the ONNX Runtime shared library (`ort` with `load-dynamic`). Takes
//! nothing, hands on the process's one `ort::Environment` or an error that lists where it
//! looked and how to fix it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use half::{f16, slice::HalfFloatSliceExt};
use ort::environment::Environment;
use ort::ep;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{builder::GraphOptimizationLevel, IoBinding, Session};
use ort::value::{DynTensor, Tensor, TensorElementType, TensorRef};

/// The library file name the Makefile installs (from the `onnxruntime` PyPI wheel).
pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";

static ENVIRONMENT: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the library on first use.
pub fn environment() -> Result<&'static Environment> {
    ENVIRONMENT
        .get_or_init(|| load().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn load() -> Result<Environment> {
    let path = locate()?;
    ort::init_from(&path)
        .map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            anyhow!(
                "cannot load ONNX Runtime from {}: {e}{cause}",
                path.display()
            )
        })?
        .with_name("vae-pipeline")
        .build()
        .map_err(|e| anyhow!("cannot start ONNX Runtime from {}: {e}", path.display()))
}

/// Where the library was found and by which rule.
pub struct Located {
    pub path: PathBuf,
    pub rule: &'static str,
}

/// In order: `ORT_DYLIB_PATH`; the `onnxruntime` (or `onnxruntime-gpu`) package of the Python
/// environment this binary is installed in (`pip install vae-pipeline`: `<prefix>/bin/` beside
/// `<prefix>/lib/python3.*/site-packages/`); `.ort/` in the working directory (a checkout after
/// `make setup`); the `onnxruntime` package of `python3` on the PATH.
pub fn locate() -> Result<PathBuf> {
    Ok(locate_with_rule()?.path)
}

pub fn locate_with_rule() -> Result<Located> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(Located {
                path: p,
                rule: "ORT_DYLIB_PATH",
            });
        }
        bail!(
            "ORT_DYLIB_PATH is set to {}, which is not a file. Point it at libonnxruntime.so \
             (from `pip download --no-deps onnxruntime==1.31.1`, unzip onnxruntime/capi/), or unset \
             it to use the onnxruntime package installed with vae-pipeline (`pip install \
             onnxruntime`) or, in a checkout, `.ort/` after `make setup`",
            p.display()
        );
    }
    let mut looked = vec!["ORT_DYLIB_PATH (not set)".to_string()];
    match installed_prefix() {
        Some(prefix) => {
            if let Some(p) = onnxruntime_in(&prefix) {
                return Ok(Located {
                    path: p,
                    rule: "the onnxruntime package installed with vae-pipeline",
                });
            }
            looked.push(format!(
                "{}/lib/python3.*/site-packages/onnxruntime/capi/",
                prefix.display()
            ));
        }
        None => looked.push("the environment of this binary (it is not in a bin/ folder)".into()),
    }
    let checkout = Path::new(".ort").join(ORT_LIBRARY);
    if checkout.is_file() {
        return Ok(Located {
            path: checkout,
            rule: ".ort/ in the working directory (make setup)",
        });
    }
    looked.push(checkout.display().to_string());
    match python_onnxruntime() {
        Some(p) => {
            return Ok(Located {
                path: p,
                rule: "the onnxruntime package of python3",
            })
        }
        None => looked.push("the `onnxruntime` package of python3 (not installed)".into()),
    }
    bail!(
        "ONNX Runtime library not found. Looked in:\n  {}\nFix: `pip install onnxruntime` (or \
         onnxruntime-gpu) into the environment vae-pipeline is installed in, run `make setup` in a \
         checkout, or set ORT_DYLIB_PATH to a libonnxruntime.so (1.24 or newer)",
        looked.join("\n  ")
    )
}

/// The install prefix of this binary: `<prefix>/bin/vae-pipeline`.
pub fn installed_prefix() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?;
    (bin.file_name()? == "bin").then(|| bin.parent().map(Path::to_path_buf))?
}

/// `libonnxruntime.so*` of the `onnxruntime` package under `<prefix>/lib*/python3*/site-packages`.
fn onnxruntime_in(prefix: &Path) -> Option<PathBuf> {
    let mut found = Vec::new();
    for lib in ["lib", "lib64"] {
        for entry in std::fs::read_dir(prefix.join(lib)).ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("python3") {
                found.extend(libraries_in(
                    &entry.path().join("site-packages/onnxruntime/capi"),
                ));
            }
        }
    }
    found.sort();
    found.pop()
}

fn libraries_in(capi: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(capi)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn python_onnxruntime() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let capi = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("capi");
    let mut libs = libraries_in(&capi);
    libs.sort();
    libs.pop()
}

/// Builder errors carry the builder and are not `Send`; keep only the message.
fn builder_err(e: ort::Error<ort::session::builder::SessionBuilder>) -> anyhow::Error {
    anyhow!("{}", ort::Error::<()>::from(e))
}

/// Where sessions run: `--device cpu`, `cuda`, `cuda:N` or `cuda:0,1,…`, optionally followed by
/// CUDA session options (`cuda:0,nhwc=0,algo=exhaustive,sessions=2`, see `CudaOptions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// `sessions` sessions per listed GPU, all fed from one queue.
    Cuda(Gpus),
}

/// The GPUs of `--device cuda:…` and the options every session on them shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpus {
    pub ids: Vec<i32>,
    pub options: CudaOptions,
}

/// ONNX Runtime CUDA provider settings, each a `key=value` item of `--device`. The defaults are
/// this project's choices where measured, ONNX Runtime's otherwise (benches/gpu/device_check.sh
/// sweeps every one of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaOptions {
    /// `nhwc=1`: NHWC convolution kernels (ORT default off).
    pub nhwc: bool,
    /// `algo=heuristic|exhaustive|default`: cuDNN convolution algorithm search (ORT default
    /// exhaustive).
    pub algo: ConvAlgo,
    /// `fuse_conv_bias=1`: cuDNN conv+bias fusion (ORT default off).
    pub fuse_conv_bias: bool,
    /// `cuda_graph=1`: replay one captured CUDA graph per shape. Needs the input resident on the
    /// GPU, so only `bench-encoder`'s encoder-only measurement can use it.
    pub cuda_graph: bool,
    /// `tf32=0`: plain fp32 convolutions instead of TF32 tensor cores (ORT default on).
    pub tf32: bool,
    /// `sessions=N`: sessions (each with its own thread and CUDA stream) per GPU, so that one
    /// batch's copies overlap another's compute. Two keep a GPU fed while one copies.
    pub sessions: usize,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            nhwc: true,
            algo: ConvAlgo::Heuristic,
            fuse_conv_bias: false,
            cuda_graph: false,
            tf32: true,
            sessions: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvAlgo {
    Heuristic,
    Exhaustive,
    Default,
}

impl ConvAlgo {
    fn name(self) -> &'static str {
        match self {
            ConvAlgo::Heuristic => "heuristic",
            ConvAlgo::Exhaustive => "exhaustive",
            ConvAlgo::Default => "default",
        }
    }
}

impl CudaOptions {
    /// Sets one `key=value` item; the error names the keys and values accepted.
    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let flag = |v: &str| match v {
            "1" | "true" | "on" => Ok(true),
            "0" | "false" | "off" => Ok(false),
            _ => Err(anyhow!("--device option {key}={v}: expected 1 or 0")),
        };
        match key {
            "nhwc" => self.nhwc = flag(value)?,
            "fuse_conv_bias" => self.fuse_conv_bias = flag(value)?,
            "cuda_graph" => self.cuda_graph = flag(value)?,
            "tf32" => self.tf32 = flag(value)?,
            "algo" => {
                self.algo = match value {
                    "heuristic" => ConvAlgo::Heuristic,
                    "exhaustive" => ConvAlgo::Exhaustive,
                    "default" => ConvAlgo::Default,
                    _ => bail!(
                        "--device option algo={value}: expected heuristic, exhaustive or default"
                    ),
                }
            }
            "sessions" => {
                self.sessions = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=16).contains(n))
                    .ok_or_else(|| {
                        anyhow!(
                            "--device option sessions={value}: expected 1 to 16 sessions per GPU"
                        )
                    })?
            }
            _ => bail!(
                "--device option {key:?} is unknown: the CUDA options are nhwc, algo, \
                 fuse_conv_bias, cuda_graph, tf32 and sessions"
            ),
        }
        Ok(())
    }

    /// The options that differ from the defaults, as `--device` items.
    fn changed(&self) -> Vec<String> {
        let d = CudaOptions::default();
        let b = |v: bool| u8::from(v);
        let mut out = Vec::new();
        if self.nhwc != d.nhwc {
            out.push(format!("nhwc={}", b(self.nhwc)));
        }
        if self.algo != d.algo {
            out.push(format!("algo={}", self.algo.name()));
        }
        if self.fuse_conv_bias != d.fuse_conv_bias {
            out.push(format!("fuse_conv_bias={}", b(self.fuse_conv_bias)));
        }
        if self.cuda_graph != d.cuda_graph {
            out.push(format!("cuda_graph={}", b(self.cuda_graph)));
        }
        if self.tf32 != d.tf32 {
            out.push(format!("tf32={}", b(self.tf32)));
        }
        if self.sessions != d.sessions {
            out.push(format!("sessions={}", self.sessions));
        }
        out
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(gpus) => {
                let mut items: Vec<String> = gpus.ids.iter().map(i32::to_string).collect();
                items.extend(gpus.options.changed());
                write!(f, "cuda:{}", items.join(","))
            }
        }
    }
}

/// One session to open: its GPU and options, or None for the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gpu {
    pub id: i32,
    pub options: CudaOptions,
}

impl Device {
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = || {
            anyhow!(
                "--device {spec:?}: expected cpu, cuda, cuda:N or cuda:N,M,… (GPU ordinals), \
                 optionally followed by CUDA options such as cuda:0,nhwc=1,algo=exhaustive,sessions=2"
            )
        };
        let spec = spec.trim();
        if spec == "cpu" {
            return Ok(Device::Cpu);
        }
        let items = match spec.strip_prefix("cuda") {
            Some("") => "0",
            Some(rest) => rest.strip_prefix(':').ok_or_else(bad)?,
            None => return Err(bad()),
        };
        let mut gpus = Gpus {
            ids: Vec::new(),
            options: CudaOptions::default(),
        };
        for item in items.split(',').map(str::trim) {
            match item.split_once('=') {
                Some((key, value)) => gpus.options.set(key.trim(), value.trim())?,
                None => gpus
                    .ids
                    .push(item.parse::<u16>().map(i32::from).map_err(|_| bad())?),
            }
        }
        if gpus.ids.is_empty() {
            gpus.ids.push(0);
        }
        let mut unique = gpus.ids.clone();
        unique.sort_unstable();
        unique.dedup();
        if unique.len() != gpus.ids.len() {
            bail!("--device {spec:?} names a GPU twice");
        }
        Ok(Device::Cuda(gpus))
    }

    /// One entry per session to open: None for the CPU, else the GPU and its options
    /// (`sessions` entries per GPU, interleaved so that batches alternate between GPUs).
    pub fn placements(&self) -> Vec<Option<Gpu>> {
        match self {
            Device::Cpu => vec![None],
            Device::Cuda(gpus) => (0..gpus.options.sessions)
                .flat_map(|_| {
                    gpus.ids.iter().map(|&id| {
                        Some(Gpu {
                            id,
                            options: gpus.options,
                        })
                    })
                })
                .collect(),
        }
    }
}

/// A session for one model file, as every stage opens one: all graph optimizations, and
/// `intra_threads` intra-op threads that do not spin while the CPU stages run.
pub fn session(path: &Path, intra_threads: usize) -> Result<Session> {
    session_on(path, intra_threads, None)
}

/// `session` on the CPU (`gpu` None) or on one CUDA GPU. CUDA registration errors out
/// instead of quietly running on the CPU; the error says what is missing.
pub fn session_on(path: &Path, intra_threads: usize, gpu: Option<Gpu>) -> Result<Session> {
    let mut builder = Session::builder(environment()?)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(builder_err)?
        .with_intra_threads(intra_threads.max(1))
        .map_err(builder_err)?
        .with_intra_op_spinning(false)
        .map_err(builder_err)?;
    if let Some(Gpu { id, options }) = gpu {
        let algo = match options.algo {
            ConvAlgo::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
            ConvAlgo::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
            ConvAlgo::Default => ep::cuda::ConvAlgorithmSearch::Default,
        };
        let cuda = ep::CUDA::default()
            .with_device_id(id)
            .with_conv_algorithm_search(algo)
            .with_prefer_nhwc(options.nhwc)
            .with_fuse_conv_bias(options.fuse_conv_bias)
            .with_cuda_graph(options.cuda_graph)
            .with_tf32(options.tf32)
            .with_arena_extend_strategy(ep::ArenaExtendStrategy::SameAsRequested)
            .build()
            .error_on_failure();
        builder = builder
            .with_execution_providers([cuda])
            .map_err(|e| cuda_unavailable(id, &e.to_string()))?;
    }
    Ok(builder.commit_from_file(path)?)
}

fn cuda_unavailable(id: i32, cause: &str) -> anyhow::Error {
    let lib = locate().map_or_else(|_| "?".into(), |p| p.display().to_string());
    anyhow!(
        "--device cuda:{id}: ONNX Runtime could not use its CUDA execution provider: {cause}\n\
         The library in use is {lib}. CUDA needs the GPU build of ONNX Runtime 1.31 \
         (`pip download --no-deps onnxruntime-gpu==1.31.1`, unzip onnxruntime/capi/lib*.so* into one \
         folder, set ORT_DYLIB_PATH to its libonnxruntime.so.1.31.1) with \
         libonnxruntime_providers_cuda.so beside it, CUDA 13 and cuDNN 9 on LD_LIBRARY_PATH \
         (pip: nvidia-cuda-runtime, nvidia-cublas, nvidia-cudnn-cu13), and a visible GPU \
         (nvidia-smi). Or run with --device cpu."
    )
}

/// One batch of NCHW pixels in the model's input type.
#[derive(Clone, Copy)]
pub enum Pixels<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// A 4-D model output as ONNX Runtime produced it (no conversion pass).
pub enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl Values<'_> {
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range` as f32 (a copy; f16 converted with the CPU's F16C instructions).
    pub fn f32_range(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        match self {
            Values::F32(v) => v[range].to_vec(),
            Values::F16(v) => {
                let mut out = vec![0.0; range.len()];
                v[range].convert_to_f32_slice(&mut out);
                out
            }
        }
    }
}

/// Runs one encoder session. On CUDA through ONNX Runtime's IO binding: the batch is copied into
/// a staging tensor of page-locked memory (so the copy to the GPU is a DMA) and the output is
/// bound to page-locked memory too, so a run does one copy in and one out and nothing converts
/// values on this thread. On the CPU a batch in the input type is read in place.
pub struct Runner {
    session: Session,
    input: String,
    output: String,
    input_f16: bool,
    gpu: Option<Gpu>,
    host: Allocator,
    binding: IoBinding,
    /// Staging tensors by shape, reused across batches (a few shapes with buckets).
    staging: Vec<([usize; 4], DynTensor)>,
}

/// Staging tensors kept per session: one per bucket shape and partial batch, bounded.
const STAGING_KEPT: usize = 8;

impl Runner {
    pub fn new(
        session: Session,
        input: String,
        output: String,
        input_f16: bool,
        gpu: Option<Gpu>,
    ) -> Result<Self> {
        let host = match gpu {
            None => Allocator::default(),
            Some(g) => Allocator::new(
                &session,
                MemoryInfo::new(
                    AllocationDevice::CUDA_PINNED,
                    g.id,
                    AllocatorType::Device,
                    MemoryType::CPUInput,
                )?,
            )
            .context("cannot allocate page-locked host memory for the CUDA session")?,
        };
        let binding = session.create_binding()?;
        Ok(Runner {
            session,
            input,
            output,
            input_f16,
            gpu,
            host,
            binding,
            staging: Vec::new(),
        })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn input_f16(&self) -> bool {
        self.input_f16
    }

    /// Runs one batch of `shape` pixels; `read` gets the output's shape and values while they
    /// are bound (no copy out).
    pub fn run<R>(
        &mut self,
        pixels: Pixels,
        shape: [usize; 4],
        read: impl FnOnce([usize; 4], Values) -> Result<R>,
    ) -> Result<R> {
        if self.gpu.is_some_and(|g| g.options.cuda_graph) {
            bail!(
                "--device cuda_graph=1 needs the input resident on the GPU at one address; only \
                 bench-encoder's encoder-only measurement does that. Run precompute without it."
            );
        }
        // On the CPU a batch already in the input type is read where it lies: no staging copy.
        let direct = match (self.gpu, pixels, self.input_f16) {
            (None, Pixels::F32(p), false) => {
                Some(TensorRef::from_array_view((shape, p))?.into_dyn())
            }
            (None, Pixels::F16(p), true) => {
                Some(TensorRef::from_array_view((shape, p))?.into_dyn())
            }
            _ => None,
        };
        if let Some(view) = direct {
            let outputs = self
                .session
                .run(ort::inputs![self.input.as_str() => view])?;
            let (dims, values) = extract(&outputs[self.output.as_str()], &self.output)?;
            check_dims(&self.output, &dims, shape[0])?;
            return read(std::array::from_fn(|i| dims[i] as usize), values);
        }
        let at = match self.staging.iter().position(|(s, _)| *s == shape) {
            Some(at) => at,
            None => {
                if self.staging.len() >= STAGING_KEPT {
                    self.staging.clear();
                }
                let ty = if self.input_f16 {
                    TensorElementType::Float16
                } else {
                    TensorElementType::Float32
                };
                let tensor = DynTensor::new(&self.host, ty, shape.map(|d| d as i64).to_vec())?;
                self.staging.push((shape, tensor));
                self.staging.len() - 1
            }
        };
        let tensor = &mut self.staging[at].1;
        // A batch already in the input type is copied; another is converted on the way in.
        match (pixels, self.input_f16) {
            (Pixels::F32(p), false) => tensor.try_extract_tensor_mut::<f32>()?.1.copy_from_slice(p),
            (Pixels::F16(p), true) => tensor.try_extract_tensor_mut::<f16>()?.1.copy_from_slice(p),
            (Pixels::F32(p), true) => tensor
                .try_extract_tensor_mut::<f16>()?
                .1
                .convert_from_f32_slice(p),
            (Pixels::F16(p), false) => {
                p.convert_to_f32_slice(tensor.try_extract_tensor_mut::<f32>()?.1)
            }
        }
        self.binding.bind_input(&self.input, &*tensor)?;
        let host_out = MemoryInfo::new(
            if self.gpu.is_some() {
                AllocationDevice::CUDA_PINNED
            } else {
                AllocationDevice::CPU
            },
            self.gpu.map_or(0, |g| g.id),
            AllocatorType::Device,
            MemoryType::CPUOutput,
        )?;
        self.binding
            .bind_output_to_device(&self.output, &host_out)?;
        let outputs = self.session.run_binding(&self.binding)?;
        let (dims, values) = extract(&outputs[self.output.as_str()], &self.output)?;
        check_dims(&self.output, &dims, shape[0])?;
        read(std::array::from_fn(|i| dims[i] as usize), values)
    }

    /// Encoder-only time, as the PyTorch peer measures it: `pixels` copied to the session's
    /// device once and bound once, the output left there, `runs` timed runs after `warmup`.
    pub fn resident(
        &mut self,
        pixels: Pixels,
        shape: [usize; 4],
        warmup: usize,
        runs: usize,
    ) -> Result<std::time::Duration> {
        let dims = shape.map(|d| d as i64).to_vec();
        let host: DynTensor = match pixels {
            Pixels::F32(p) => Tensor::from_array((dims, p.to_vec()))?.upcast(),
            Pixels::F16(p) => Tensor::from_array((dims, p.to_vec()))?.upcast(),
        };
        let (device, id) = match self.gpu {
            Some(g) => (AllocationDevice::CUDA, g.id),
            None => (AllocationDevice::CPU, 0),
        };
        let resident = match self.gpu {
            Some(_) => host.to(device.clone(), id)?,
            None => host,
        };
        let mut binding = self.session.create_binding()?;
        binding.bind_input(&self.input, &resident)?;
        binding.bind_output_to_device(
            &self.output,
            &MemoryInfo::new(device, id, AllocatorType::Device, MemoryType::Default)?,
        )?;
        for _ in 0..warmup {
            self.session.run_binding(&binding)?;
        }
        binding.synchronize_outputs()?;
        let start = std::time::Instant::now();
        for _ in 0..runs {
            self.session.run_binding(&binding)?;
        }
        binding.synchronize_outputs()?;
        Ok(start.elapsed())
    }
}

fn extract<'a>(value: &'a ort::value::DynValue, output: &str) -> Result<(Vec<i64>, Values<'a>)> {
    match value.try_extract_tensor::<f32>() {
        Ok((s, v)) => Ok((s.to_vec(), Values::F32(v))),
        Err(_) => {
            let (s, v) = value.try_extract_tensor::<f16>().with_context(|| {
                format!("model output {output:?} is neither float32 nor float16")
            })?;
            Ok((s.to_vec(), Values::F16(v)))
        }
    }
}

fn check_dims(output: &str, dims: &[i64], batch: usize) -> Result<()> {
    if dims.len() != 4 || dims[0] as usize != batch {
        bail!("model output {output:?} has shape {dims:?}; expected [{batch}, C, H, W]");
    }
    Ok(())
}

/// Runs `session` on one NCHW tensor (`data` as f32, converted when the model takes f16) and
/// returns its 4-D output `output` as f32, whatever float type the model produces. For the
/// one-off runs of `export` and `report`; the encode stage uses `Runner`.
pub fn run_nchw(
    session: &mut Session,
    input: &str,
    output: &str,
    input_f16: bool,
    data: &[f32],
    shape: [usize; 4],
) -> Result<([usize; 4], Vec<f32>)> {
    let outputs = if input_f16 {
        let mut half = vec![f16::ZERO; data.len()];
        half.convert_from_f32_slice(data);
        session.run(ort::inputs![input => Tensor::from_array((shape, half))?])?
    } else {
        session
            .run(ort::inputs![input => ort::value::TensorRef::from_array_view((shape, data))?])?
    };
    let (dims, values) = extract(&outputs[output], output)?;
    check_dims(output, &dims, shape[0])?;
    let all = values.f32_range(0..values.len());
    Ok((std::array::from_fn(|i| dims[i] as usize), all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_to_one_session_per_gpu() {
        assert_eq!(Device::parse("cpu").unwrap().placements(), vec![None]);
        let ids =
            |d: &Device| -> Vec<i32> { d.placements().iter().map(|g| g.unwrap().id).collect() };
        assert_eq!(ids(&Device::parse("cuda").unwrap()), vec![0, 0]);
        let two = Device::parse("cuda:1, 3").unwrap();
        assert_eq!(
            ids(&two),
            vec![1, 3, 1, 3],
            "two sessions per GPU by default"
        );
        assert_eq!(two.to_string(), "cuda:1,3");
        for bad in [
            "gpu",
            "cuda:",
            "cuda:x",
            "cuda:-1",
            "cuda:0,0",
            "cuda:0,nhwc=2",
            "cuda:0,algo=fast",
            "cuda:0,sessions=0",
            "cuda:0,speed=1",
        ] {
            assert!(Device::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cuda_options_parse_and_print_what_differs_from_the_defaults() {
        let d = Device::parse(
            "cuda:0,nhwc=0,algo=exhaustive,fuse_conv_bias=1,cuda_graph=1,tf32=0,sessions=1",
        )
        .unwrap();
        let Device::Cuda(gpus) = &d else {
            panic!("cuda")
        };
        let o = gpus.options;
        assert_eq!(
            (
                o.nhwc,
                o.algo,
                o.fuse_conv_bias,
                o.cuda_graph,
                o.tf32,
                o.sessions
            ),
            (false, ConvAlgo::Exhaustive, true, true, false, 1)
        );
        assert_eq!(d.placements().len(), 1);
        assert_eq!(
            Device::parse(&d.to_string()).unwrap(),
            d,
            "Display round-trips"
        );
        assert_eq!(
            Device::parse("cuda:2,sessions=2").unwrap().to_string(),
            "cuda:2"
        );
    }
}
