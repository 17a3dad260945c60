//! Doctor: takes the environment, hands on what this binary finds in it, for a user whose setup
//! does not work: the ONNX Runtime library (path, how it was found, its build), the execution
//! providers it offers, whether a CUDA GPU is visible, and the model card folders searched.

use std::fmt::Write;

use ort::ep::ExecutionProvider;

/// The report, one fact a line.
pub fn report() -> String {
    let mut s = String::new();
    let _ = writeln!(s, "vae-pipeline {}", env!("CARGO_PKG_VERSION"));
    match crate::runtime::locate_with_rule() {
        Ok(found) => {
            let _ = writeln!(
                s,
                "ONNX Runtime: {} (found through {})",
                found.path.display(),
                found.rule
            );
            match crate::runtime::environment() {
                Ok(_) => {
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
            dir.display(),
            if cards.is_empty() {
                "(none)".to_string()
            } else {
                cards.join(", ")
            }
        );
    }
    s
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
