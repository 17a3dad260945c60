//! Progress: a bar with a total and an ETA on a terminal, a plain line every 10 s elsewhere
//! (logs, `make`, Slurm). One module for `precompute` and `report`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    unit: &'static str,
    done: u64,
    start: Instant,
    last_line: Instant,
}

impl Progress {
    /// `total` items of `unit` (e.g. "images") are expected.
    pub fn new(total: u64, unit: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} (eta {{eta}})"
                ))
                .expect("valid progress template")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            total,
            unit,
            done: 0,
            start: now,
            last_line: now,
        }
    }

    /// `n` more items are done; `note` says what is going on (a model, failures so far).
    pub fn advance(&mut self, n: u64, note: &str) {
        self.set(self.done + n, note);
    }

    /// `done` items are done in all.
    pub fn set(&mut self, done: u64, note: &str) {
        self.done = done;
        match &self.bar {
            Some(bar) => {
                bar.set_message(note.to_string());
                bar.set_position(done);
            }
            None if self.last_line.elapsed() >= Duration::from_secs(10) => {
                self.last_line = Instant::now();
                eprintln!("progress: {}", self.line(note));
            }
            None => {}
        }
    }

    /// `done/total unit (pct%), rate/s, eta …, note`.
    fn line(&self, note: &str) -> String {
        let elapsed = self.start.elapsed().as_secs_f64();
        let rate = self.done as f64 / elapsed.max(1e-9);
        let left = self.total.saturating_sub(self.done) as f64;
        let eta = if rate > 0.0 {
            let s = (left / rate).round() as u64;
            format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        } else {
            "unknown".into()
        };
        format!(
            "{}/{} {} ({:.0}%), {rate:.2}/s, eta {eta}{}",
            self.done,
            self.total,
            self.unit,
            100.0 * self.done as f64 / self.total.max(1) as f64,
            if note.is_empty() {
                String::new()
            } else {
                format!(", {note}")
            }
        )
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_line_has_the_total_the_share_and_an_eta() {
        let mut p = Progress::new(10, "images");
        p.start = Instant::now() - Duration::from_secs(5);
        p.done = 5;
        let line = p.line("0 failed");
        assert!(
            line.starts_with("5/10 images (50%), 1.00/s, eta 0:00:05, 0 failed"),
            "{line}"
        );
    }
}
