//! Finding and loading the ONNX Runtime shared library (`ort` with `load-dynamic`). Takes
//! nothing, hands on the process's one `ort::Environment` or an error that lists where it
//! looked and how to fix it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use half::f16;
use ort::environment::Environment;
use ort::ep;
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::Tensor;

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

/// Where sessions run: `--device cpu`, `cuda`, `cuda:N` or `cuda:0,1,…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// One session per listed GPU, all fed from one queue.
    Cuda(Vec<i32>),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(ids) => {
                let ids: Vec<String> = ids.iter().map(i32::to_string).collect();
                write!(f, "cuda:{}", ids.join(","))
            }
        }
    }
}

impl Device {
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = || {
            anyhow!("--device {spec:?}: expected cpu, cuda, cuda:N or cuda:N,M,… (GPU ordinals)")
        };
        match spec.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(vec![0])),
            other => {
                let ids = other.strip_prefix("cuda:").ok_or_else(bad)?;
                let ids: Vec<i32> = ids
                    .split(',')
                    .map(|id| id.trim().parse::<u16>().map(i32::from))
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad())?;
                let mut unique = ids.clone();
                unique.sort_unstable();
                unique.dedup();
                if unique.len() != ids.len() {
                    bail!("--device {spec:?} names a GPU twice");
                }
                Ok(Device::Cuda(ids))
            }
        }
    }

    /// One entry per session to open: None for the CPU, else the GPU ordinal.
    pub fn placements(&self) -> Vec<Option<i32>> {
        match self {
            Device::Cpu => vec![None],
            Device::Cuda(ids) => ids.iter().copied().map(Some).collect(),
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
pub fn session_on(path: &Path, intra_threads: usize, gpu: Option<i32>) -> Result<Session> {
    let mut builder = Session::builder(environment()?)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(builder_err)?
        .with_intra_threads(intra_threads.max(1))
        .map_err(builder_err)?
        .with_intra_op_spinning(false)
        .map_err(builder_err)?;
    if let Some(id) = gpu {
        let cuda = ep::CUDA::default()
            .with_device_id(id)
            .with_conv_algorithm_search(ep::cuda::ConvAlgorithmSearch::Heuristic)
            .with_prefer_nhwc(true)
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

/// Runs `session` on one NCHW tensor (`data` as f32, converted when the model takes f16) and
/// returns its 4-D output `output` as f32, whatever float type the model produces.
pub fn run_nchw(
    session: &mut Session,
    input: &str,
    output: &str,
    input_f16: bool,
    data: &[f32],
    shape: [usize; 4],
) -> Result<([usize; 4], Vec<f32>)> {
    let outputs = if input_f16 {
        let half: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
        session.run(ort::inputs![input => Tensor::from_array((shape, half))?])?
    } else {
        session
            .run(ort::inputs![input => ort::value::TensorRef::from_array_view((shape, data))?])?
    };
    let value = &outputs[output];
    let (dims, values) = match value.try_extract_tensor::<f32>() {
        Ok((s, v)) => (s.to_vec(), v.to_vec()),
        Err(_) => {
            let (s, v) = value.try_extract_tensor::<f16>().with_context(|| {
                format!("model output {output:?} is neither float32 nor float16")
            })?;
            (s.to_vec(), v.iter().map(|x| x.to_f32()).collect())
        }
    };
    if dims.len() != 4 || dims[0] as usize != shape[0] {
        bail!(
            "model output {output:?} has shape {dims:?}; expected [{}, C, H, W]",
            shape[0]
        );
    }
    Ok((std::array::from_fn(|i| dims[i] as usize), values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_to_one_session_per_gpu() {
        assert_eq!(Device::parse("cpu").unwrap().placements(), vec![None]);
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(vec![0]));
        let two = Device::parse("cuda:1, 3").unwrap();
        assert_eq!(two.placements(), vec![Some(1), Some(3)]);
        assert_eq!(two.to_string(), "cuda:1,3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:0,0"] {
            assert!(Device::parse(bad).is_err(), "{bad}");
        }
    }
}
