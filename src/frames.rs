//! Which frames of a clip become which training windows, exactly as musubi-tuner's video
//! dataset takes them (`src/musubi_tuner/dataset/image_video_dataset.py` `VideoDataset`,
//! `media_utils.load_video`, at the commit `tests/fixtures/musubi_frames.json` records), so a
//! cache made from our shards holds the items musubi's own caching would: the same
//! `{stem}_{start:05d}-{count:03d}` keys over the same source frames.
//!
//! musubi counts frames in decode order and ignores their timestamps: `source_fps` is a setting
//! that declares every clip's rate, not the rate read from the file, and without it every frame
//! is used whatever the clip's rate. Frame positions (`start`) are positions in the resampled
//! sequence; `Window::indices` maps them back to the clip's own frame indices.
//!
//! Pure: no decoding here; the caller decodes the frames the windows name.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Frames per latent frame of the Wan VAE: a window holds N·4+1 frames (musubi's
/// `vae_frame_stride`).
pub const FRAME_FACTOR: usize = 4;

/// musubi's `frame_extraction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FrameExtraction {
    /// The first N frames, for each N of `target_frames` the clip is long enough for.
    #[default]
    Head,
    /// Back-to-back windows of N frames from frame 0; a shorter rest is left out.
    Chunk,
    /// Windows of N frames starting every `frame_stride` frames.
    Slide,
    /// `frame_sample` windows of N frames, their starts spread evenly over the clip.
    Uniform,
    /// One window of the whole clip, cut to `max_frames` and then down to N·4+1.
    Full,
}

impl FrameExtraction {
    pub fn as_str(self) -> &'static str {
        match self {
            FrameExtraction::Head => "head",
            FrameExtraction::Chunk => "chunk",
            FrameExtraction::Slide => "slide",
            FrameExtraction::Uniform => "uniform",
            FrameExtraction::Full => "full",
        }
    }
}

/// musubi's video dataset options (its `[[datasets]]` keys, with its defaults), the `[video]`
/// table of a preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrameOptions {
    /// Window lengths, each N·4+1.
    pub target_frames: Vec<usize>,
    #[serde(rename = "frame_extraction")]
    pub extraction: FrameExtraction,
    /// `slide`: frames between window starts.
    #[serde(rename = "frame_stride")]
    pub stride: usize,
    /// `uniform`: windows per length (1 makes it `head`, as in musubi).
    #[serde(rename = "frame_sample")]
    pub sample: usize,
    /// `full`: the longest window.
    pub max_frames: usize,
    /// The rate every clip is taken to have; frames are then dropped (or skipped over) to
    /// `target_fps`. None uses every frame.
    pub source_fps: Option<f64>,
    /// The model's training rate (musubi's `TARGET_FPS_WAN`).
    pub target_fps: f64,
}

impl Default for FrameOptions {
    /// musubi's defaults (`config_utils.VideoDatasetParams`) and Wan's rate.
    fn default() -> Self {
        FrameOptions {
            target_frames: vec![1],
            extraction: FrameExtraction::Head,
            stride: 1,
            sample: 1,
            max_frames: 129,
            source_fps: None,
            target_fps: 16.0,
        }
    }
}

/// One training item: `count()` consecutive frames of the (resampled) clip from `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Position of the first frame in the resampled sequence: musubi's `crop_pos`.
    pub start: usize,
    /// The clip's own indices (decode order) of the window's frames, in order.
    pub indices: Vec<usize>,
}

impl Window {
    /// Frames in the window: musubi's `target_frame`.
    pub fn count(&self) -> usize {
        self.indices.len()
    }

    /// `{start:05d}-{count:03d}`: what musubi appends to a clip's stem for the item key, and
    /// what a window's shard key appends to the clip's key.
    pub fn suffix(&self) -> String {
        format!("{:05}-{:03}", self.start, self.count())
    }
}

impl FrameOptions {
    /// Refuses what musubi would round, ignore or crash on, saying what to write instead.
    pub fn check(&self) -> Result<()> {
        if self.target_frames.is_empty() {
            bail!(
                "target_frames is empty: list the window lengths, e.g. target_frames = [1, 25, 45] \
                 (musubi's default is [1])"
            );
        }
        for &f in &self.target_frames {
            if f == 0 || (f - 1) % FRAME_FACTOR != 0 {
                let down = f.saturating_sub(1) / FRAME_FACTOR * FRAME_FACTOR + 1;
                bail!(
                    "target_frames: {f} is not N·4+1 (the Wan VAE takes 1, 5, 9, … frames): use \
                     {down} (what musubi rounds it down to) or {}",
                    down + FRAME_FACTOR
                );
            }
        }
        if self.stride == 0 {
            bail!("frame_stride = 0: windows must move on; use 1 or more");
        }
        if self.sample == 0 {
            bail!("frame_sample = 0 takes no window: use 1 or more");
        }
        if self.max_frames == 0 {
            bail!("max_frames = 0 leaves no frame: use 1 or more (musubi's default is 129)");
        }
        if let Some(fps) = self.source_fps {
            if !(fps.is_finite() && fps > 0.0) {
                bail!("source_fps = {fps}: give the clips' frame rate, e.g. 30.0, or leave it out");
            }
        }
        if !(self.target_fps.is_finite() && self.target_fps > 0.0) {
            bail!(
                "target_fps = {}: give the model's frame rate (16.0 for Wan)",
                self.target_fps
            );
        }
        Ok(())
    }

    /// The rate of the frames in a window of a clip of rate `clip_fps`: `target_fps` when
    /// `source_fps` resamples, else the clip's own.
    pub fn window_fps(&self, clip_fps: f64) -> f64 {
        if self.source_fps.is_some() {
            self.target_fps
        } else {
            clip_fps
        }
    }

    /// `uniform` with one sample is `head` (musubi switches it, which also limits loading).
    fn effective_extraction(&self) -> FrameExtraction {
        if self.extraction == FrameExtraction::Uniform && self.sample == 1 {
            FrameExtraction::Head
        } else {
            self.extraction
        }
    }
}

/// The clip's frames as musubi loads them (`load_video`): with `source_fps`, frame i is kept
/// when `int(acc)` moved on from the last kept frame, `acc` summing `target_fps / source_fps`
/// per frame (in that order, in f64, as Python does); with `limit` (`head`: the longest
/// window), loading stops at the first frame whose resampled position reaches it.
fn loaded_frames(options: &FrameOptions, frame_count: usize, limit: Option<usize>) -> Vec<usize> {
    let Some(source_fps) = options.source_fps else {
        return (0..frame_count.min(limit.unwrap_or(usize::MAX))).collect();
    };
    let delta = options.target_fps / source_fps;
    let mut acc = 0.0_f64;
    let mut previous: Option<u64> = None;
    let mut kept = Vec::new();
    for i in 0..frame_count {
        let position = acc as u64;
        acc += delta;
        if previous == Some(position) {
            continue;
        }
        previous = Some(position);
        if limit.is_some_and(|l| position >= l as u64) {
            break;
        }
        kept.push(i);
    }
    kept
}

/// numpy's `np.linspace(0, stop, num, dtype=int)` for num ≥ 2: `k · (stop / (num − 1))`, the
/// last exactly `stop`, floored.
fn linspace_floor(stop: usize, num: usize) -> Vec<usize> {
    let step = stop as f64 / (num - 1) as f64;
    (0..num)
        .map(|k| {
            if k == num - 1 {
                stop
            } else {
                (k as f64 * step).floor() as usize
            }
        })
        .collect()
}

/// The windows musubi's `retrieve_latent_cache_batches` makes of a clip of `frame_count`
/// frames (decode order; `ClipInfo::times.len()`), in its order: lengths ascending, starts
/// ascending. `options` must have passed `check`. Where musubi makes the same item twice
/// (`uniform` with more samples than start positions) it is listed once: musubi writes it to
/// one file. A clip shorter than a length gets no window of that length (`full`: one window
/// of the longest N·4+1 there is). No frames, no windows.
pub fn windows(options: &FrameOptions, frame_count: usize) -> Vec<Window> {
    let mut targets = options.target_frames.clone();
    targets.sort_unstable();
    targets.dedup();
    let extraction = options.effective_extraction();
    let limit = (extraction == FrameExtraction::Head).then(|| targets.last().copied().unwrap_or(0));
    let frames = loaded_frames(options, frame_count, limit);
    let n = frames.len();
    if n == 0 {
        return Vec::new();
    }
    let mut spans: Vec<(usize, usize)> = Vec::new();
    match extraction {
        FrameExtraction::Head => {
            spans.extend(targets.iter().filter(|&&t| n >= t).map(|&t| (0, t)));
        }
        FrameExtraction::Chunk => {
            for &t in &targets {
                spans.extend((0..n).step_by(t).filter(|i| i + t <= n).map(|i| (i, t)));
            }
        }
        FrameExtraction::Slide => {
            for &t in targets.iter().filter(|&&t| n >= t) {
                spans.extend((0..=n - t).step_by(options.stride).map(|i| (i, t)));
            }
        }
        FrameExtraction::Uniform => {
            for &t in targets.iter().filter(|&&t| n >= t) {
                spans.extend(
                    linspace_floor(n - t, options.sample)
                        .into_iter()
                        .map(|i| (i, t)),
                );
            }
        }
        FrameExtraction::Full => {
            let t = n.min(options.max_frames);
            spans.push((0, (t - 1) / FRAME_FACTOR * FRAME_FACTOR + 1));
        }
    }
    let mut seen = std::collections::HashSet::new();
    spans
        .into_iter()
        .filter(|span| seen.insert(*span))
        .map(|(start, count)| Window {
            start,
            indices: frames[start..start + count].to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(extraction: FrameExtraction, target_frames: &[usize]) -> FrameOptions {
        FrameOptions {
            target_frames: target_frames.to_vec(),
            extraction,
            ..FrameOptions::default()
        }
    }

    fn spans(ws: &[Window]) -> Vec<(usize, usize)> {
        ws.iter().map(|w| (w.start, w.count())).collect()
    }

    #[test]
    fn defaults_are_musubis() {
        let o: FrameOptions = toml::from_str("").unwrap();
        assert_eq!(o, FrameOptions::default());
        assert_eq!(o.target_frames, [1]);
        assert_eq!(o.max_frames, 129);
        let o: FrameOptions = toml::from_str(
            "target_frames = [1, 25, 45]\nframe_extraction = \"slide\"\nframe_stride = 10\n\
             source_fps = 30.0",
        )
        .unwrap();
        assert_eq!(o.extraction, FrameExtraction::Slide);
        assert_eq!((o.stride, o.source_fps), (10, Some(30.0)));
        assert!(toml::from_str::<FrameOptions>("frame_count = 3").is_err());
    }

    #[test]
    fn check_says_the_fix() {
        let err = |o: FrameOptions| o.check().unwrap_err().to_string();
        let e = err(options(FrameExtraction::Head, &[1, 26]));
        assert!(e.contains("26 is not N·4+1") && e.contains("use 25"), "{e}");
        assert!(err(options(FrameExtraction::Head, &[0])).contains("use 1"));
        assert!(err(options(FrameExtraction::Head, &[])).contains("empty"));
        for (o, what) in [
            (
                FrameOptions {
                    stride: 0,
                    ..FrameOptions::default()
                },
                "frame_stride",
            ),
            (
                FrameOptions {
                    sample: 0,
                    ..FrameOptions::default()
                },
                "frame_sample",
            ),
            (
                FrameOptions {
                    max_frames: 0,
                    ..FrameOptions::default()
                },
                "max_frames",
            ),
            (
                FrameOptions {
                    source_fps: Some(0.0),
                    ..FrameOptions::default()
                },
                "source_fps",
            ),
            (
                FrameOptions {
                    target_fps: f64::NAN,
                    ..FrameOptions::default()
                },
                "target_fps",
            ),
        ] {
            assert!(err(o).contains(what));
        }
        FrameOptions::default().check().unwrap();
    }

    #[test]
    fn short_clips_and_no_frames() {
        let head = options(FrameExtraction::Head, &[1, 25, 45]);
        assert_eq!(spans(&windows(&head, 24)), [(0, 1)]);
        assert_eq!(spans(&windows(&head, 45)), [(0, 1), (0, 25), (0, 45)]);
        assert!(windows(&head, 0).is_empty());
        let full = FrameOptions {
            max_frames: 45,
            ..options(FrameExtraction::Full, &[1])
        };
        assert_eq!(spans(&windows(&full, 100)), [(0, 45)]);
        assert_eq!(spans(&windows(&full, 44)), [(0, 41)]);
        assert_eq!(spans(&windows(&full, 3)), [(0, 1)]);
        assert!(windows(&full, 0).is_empty());
        let slide = FrameOptions {
            stride: 10,
            ..options(FrameExtraction::Slide, &[25])
        };
        assert!(windows(&slide, 24).is_empty());
        assert_eq!(spans(&windows(&slide, 45)), [(0, 25), (10, 25), (20, 25)]);
    }

    #[test]
    fn chunk_and_uniform() {
        let chunk = options(FrameExtraction::Chunk, &[13, 25]);
        assert_eq!(
            spans(&windows(&chunk, 50)),
            [(0, 13), (13, 13), (26, 13), (0, 25), (25, 25)]
        );
        // More samples than starts: musubi makes items 0, 0, 1, 1, 2 (one file each).
        let uniform = FrameOptions {
            sample: 5,
            ..options(FrameExtraction::Uniform, &[5])
        };
        assert_eq!(spans(&windows(&uniform, 7)), [(0, 5), (1, 5), (2, 5)]);
        let one = FrameOptions {
            sample: 1,
            ..options(FrameExtraction::Uniform, &[5])
        };
        assert_eq!(spans(&windows(&one, 70)), [(0, 5)]);
    }

    #[test]
    fn resampling_drops_frames_by_index() {
        // 30 → 16 fps: positions 0, 0.53, 1.07, 1.6, 2.13 … keep frames 0, 2, 4, 5, 7, …
        let o = FrameOptions {
            source_fps: Some(30.0),
            ..options(FrameExtraction::Head, &[5])
        };
        let w = windows(&o, 30);
        assert_eq!(w[0].indices, [0, 2, 4, 6, 8]);
        assert_eq!(w[0].suffix(), "00000-005");
        assert_eq!(o.window_fps(30.0), 16.0);
        // 8 → 16 fps: no frame repeats, positions skip; head stops at position 5.
        let up = FrameOptions {
            source_fps: Some(8.0),
            ..options(FrameExtraction::Head, &[5])
        };
        assert!(windows(&up, 4).is_empty());
        let chunk = FrameOptions {
            source_fps: Some(8.0),
            ..options(FrameExtraction::Chunk, &[5])
        };
        assert_eq!(windows(&chunk, 5)[0].indices, [0, 1, 2, 3, 4]);
    }

    /// Every case musubi's own `VideoDataset` produced (benches/musubi_frames_reference.py).
    #[test]
    fn musubi_reference() {
        #[derive(Deserialize)]
        struct Reference {
            sequences: std::collections::HashMap<String, Vec<usize>>,
            cases: Vec<Case>,
        }
        #[derive(Deserialize)]
        struct Case {
            options: FrameOptions,
            frame_count: usize,
            frames: String,
            windows: Vec<(usize, usize)>,
        }
        let reference: Reference =
            serde_json::from_str(include_str!("../tests/fixtures/musubi_frames.json")).unwrap();
        assert!(reference.cases.len() > 500);
        for case in &reference.cases {
            case.options.check().unwrap();
            let frames = &reference.sequences[&case.frames];
            let mut expected = case.windows.clone();
            expected.dedup();
            let ours = windows(&case.options, case.frame_count);
            let mut got = spans(&ours);
            got.sort_unstable();
            assert_eq!(
                got, expected,
                "{:?}, {} frames",
                case.options, case.frame_count
            );
            for w in &ours {
                assert_eq!(
                    w.indices,
                    frames[w.start..w.start + w.count()],
                    "{:?}",
                    case.options
                );
            }
        }
    }
}
