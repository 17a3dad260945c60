//! The report's progress: a bar with an ETA on a terminal, a plain line every 10 s elsewhere
//! (logs, `make`), counting (image, model) pairs done out of the total.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    last_line: Instant,
}

impl Progress {
    pub fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} image×model {msg} (eta {eta})",
                )
                .expect("valid progress template")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            total,
            done: 0,
            last_line: Instant::now(),
        }
    }

    /// `n` more pairs are done; `model` is what is being worked on.
    pub fn advance(&mut self, n: u64, model: &str) {
        self.done += n;
        match &self.bar {
            Some(bar) => {
                bar.set_message(model.to_string());
                bar.set_position(self.done);
            }
            None if self.last_line.elapsed() >= Duration::from_secs(10) => {
                self.last_line = Instant::now();
                eprintln!(
                    "progress: {}/{} image×model ({model})",
                    self.done, self.total
                );
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
