//! Doctor: takes the environment, hands on what this binary finds in it, for a user whose setup
//! does not work: the ONNX Runtime library (path, how it was found, its build), the execution
//! providers it offers, whether a CUDA GPU is visible, whether clips can be decoded (the FFmpeg
//! plugin and FFmpeg's libraries), and the model card folders searched.

use std::fmt::Write;
use std::path::Path;

use anyhow::{bail, Result};
use ort::ep::ExecutionProvider;

/// Prints the report; fails when no ONNX Runtime library loads, as nothing can be encoded then.
pub fn run() -> Result<()> {
    let (text, runtime_loads) = report();
    // A closed pipe (`doctor | head`) is not an error of the report's.
    let mut out = std::io::stdout().lock();
    let _ = std::io::Write::write_all(&mut out, text.as_bytes())
        .and_then(|_| std::io::Write::flush(&mut out));
    if !runtime_loads {
        bail!(
            "no usable ONNX Runtime library (see above): `pip install onnxruntime` (or \
             onnxruntime-gpu) into the environment vae-pipeline is installed in, or set \
             ORT_DYLIB_PATH to a libonnxruntime.so (1.24 or newer)"
        );
    }
    Ok(())
}

/// A path as an absolute one: a relative folder (`models`, `.ort/…`) means the working
/// directory's, which a user reading the report may not know.
fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// The report, one fact a line, and whether the ONNX Runtime library loads.
pub fn report() -> (String, bool) {
    let mut runtime_loads = false;
    let mut s = String::new();
    let _ = writeln!(s, "vae-pipeline {}", env!("CARGO_PKG_VERSION"));
    match crate::runtime::locate_with_rule() {
        Ok(found) => {
            let _ = writeln!(
                s,
                "ONNX Runtime: {} (found through {})",
                absolute(&found.path),
                found.rule
            );
            match crate::runtime::environment() {
                Ok(_) => {
                    runtime_loads = true;
                    let _ = writeln!(s, "  build: {}", ort::info().trim());
                    let providers = [
                        ("CPU", ort::ep::CPU::is_available()),
                        ("CUDA", ort::ep::CUDA::is_available()),
                    ];
                    let names: Vec<&str> = providers
                        .iter()
                        .filter(|(_, ok)| matches!(ok, Ok(true)))
                        .map(|(n, _)| *n)
                        .collect();
                    let _ = writeln!(s, "  execution providers: {}", names.join(", "));
                }
                Err(e) => {
                    let _ = writeln!(s, "  cannot load it: {e:#}");
                }
            }
        }
        Err(e) => {
            let _ = writeln!(s, "ONNX Runtime: not found. {e:#}");
        }
    }
    let _ = writeln!(s, "CUDA: {}", cuda_visibility());
    match crate::video::describe() {
        Ok(found) => {
            let _ = writeln!(s, "FFmpeg plugin (clips): {found}");
        }
        Err(e) => {
            let _ = writeln!(
                s,
                "FFmpeg plugin (clips): not usable, images still work. {e:#}"
            );
        }
    }
    let _ = writeln!(
        s,
        "model cards (`--model NAME` looks in these folders, in order):"
    );
    for dir in crate::model::card_dirs() {
        let mut cards: Vec<String> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        let p = e.path();
                        (p.extension()? == "toml").then_some(())?;
                        Some(p.file_stem()?.to_string_lossy().into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        cards.sort();
        let _ = writeln!(
            s,
            "  {}: {}",
            absolute(&dir),
            if cards.is_empty() {
                "(none)".to_string()
            } else {
                cards.join(", ")
            }
        );
    }
    (s, runtime_loads)
}

/// Whether the process can see an NVIDIA GPU (device nodes and `CUDA_VISIBLE_DEVICES`).
fn cuda_visibility() -> String {
    let devices: Vec<String> = std::fs::read_dir("/dev")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.strip_prefix("nvidia")
                        .is_some_and(|d| d.parse::<u32>().is_ok())
                })
                .collect()
        })
        .unwrap_or_default();
    let visible = std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|v| format!("CUDA_VISIBLE_DEVICES={v}"))
        .unwrap_or_else(|_| "CUDA_VISIBLE_DEVICES unset".into());
    if devices.is_empty() {
        format!("no GPU visible (no /dev/nvidiaN; {visible})")
    } else {
        format!("{} GPU device(s) visible ({visible})", devices.len())
    }
}
