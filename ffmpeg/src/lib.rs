//! Clip decoding behind a small C ABI, for `vae-pipeline`'s `src/video.rs`, which loads this
//! library at run time so that the binary itself never links FFmpeg.
//!
//! A clip is opened from bytes in memory (through a custom `AVIOContext`: the bytes come from
//! folders, tars, Parquet and S3 alike). `vpf_open` describes the video stream, `vpf_times` runs a demux-only pass (no decoding) for
//! every frame's presentation time; `vpf_next_frame` streams decoded frames converted to RGB24,
//! one at a time, so memory does not grow with the clip's length.
//!
//! Every function catches panics (none cross the C boundary) and reports failures as a
//! [`VpfError`]: a kind (`corrupt`, `unsupported`, `empty`) and a message.
//!
//! The ABI (structs and functions) is mirrored in `src/video.rs`; [`ABI_VERSION`] changes with it.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use ffmpeg_next::ffi::*;

/// Bumped whenever a struct or function below changes; `src/video.rs` refuses other versions.
pub const ABI_VERSION: u32 = 2;

pub const KIND_CORRUPT: u32 = 1;
pub const KIND_UNSUPPORTED: u32 = 2;
pub const KIND_EMPTY: u32 = 3;

const MESSAGE_LEN: usize = 512;
const CODEC_LEN: usize = 32;
/// The custom AVIOContext's read buffer.
const IO_BUFFER: usize = 64 * 1024;

/// A failure: `kind` is one of the `KIND_*` values, `message` a NUL-terminated UTF-8 text.
#[repr(C)]
pub struct VpfError {
    pub kind: u32,
    pub message: [u8; MESSAGE_LEN],
}

/// The video stream. `width`/`height` are the coded (stored) size; `rotation` the clockwise
/// degrees (0/90/180/270) a player turns the picture to show it upright; `codec` FFmpeg's codec
/// name, NUL-terminated.
#[repr(C)]
pub struct VpfInfo {
    pub width: u32,
    pub height: u32,
    pub rotation: u32,
    pub fps: f64,
    pub codec: [u8; CODEC_LEN],
}

/// A decoded frame as packed RGB24 rows of `stride` bytes; `data` is owned by the clip and valid
/// until the next call on it.
#[repr(C)]
pub struct VpfFrame {
    pub width: u32,
    pub height: u32,
    pub stride: usize,
    pub data: *const u8,
    pub time: f64,
}

struct Failure {
    kind: u32,
    message: String,
}

fn fail<T>(kind: u32, message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        kind,
        message: message.into(),
    })
}

fn av_error(code: c_int) -> String {
    let mut buf = [0 as c_char; 128];
    // SAFETY: av_strerror writes a NUL-terminated string into the buffer it is given.
    unsafe {
        av_strerror(code, buf.as_mut_ptr(), buf.len());
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
    }
}

/// The bytes the custom AVIOContext reads from; they belong to the caller and outlive the clip.
struct Reader {
    data: *const u8,
    len: usize,
    pos: usize,
}

unsafe extern "C" fn read_packet(opaque: *mut c_void, buf: *mut u8, size: c_int) -> c_int {
    let r = &mut *(opaque as *mut Reader);
    let n = (r.len - r.pos).min(size.max(0) as usize);
    if n == 0 {
        return AVERROR_EOF;
    }
    ptr::copy_nonoverlapping(r.data.add(r.pos), buf, n);
    r.pos += n;
    n as c_int
}

unsafe extern "C" fn seek(opaque: *mut c_void, offset: i64, whence: c_int) -> i64 {
    let r = &mut *(opaque as *mut Reader);
    if whence & AVSEEK_SIZE != 0 {
        return r.len as i64;
    }
    let base = match whence & !AVSEEK_FORCE {
        0 => 0,            // SEEK_SET
        1 => r.pos as i64, // SEEK_CUR
        2 => r.len as i64, // SEEK_END
        _ => return AVERROR(libc::EINVAL) as i64,
    };
    let target = base + offset;
    if target < 0 || target > r.len as i64 {
        return AVERROR(libc::EINVAL) as i64;
    }
    r.pos = target as usize;
    target
}

/// An open clip: the demuxer over the caller's bytes, the video stream's decoder, and the RGB
/// conversion (rebuilt only when a frame's size or format changes).
pub struct Clip {
    reader: Box<Reader>,
    format: *mut AVFormatContext,
    stream: c_int,
    time_base: f64,
    decoder: *mut AVCodecContext,
    packet: *mut AVPacket,
    frame: *mut AVFrame,
    rgb: *mut AVFrame,
    scaler: *mut SwsContext,
    /// What `scaler` was set up for: size, pixel format, colour matrix, full range.
    scaler_for: Option<(c_int, c_int, c_int, c_int, bool)>,
    /// The first decoded frame's size; a clip whose size changes midway is refused.
    size: Option<(c_int, c_int)>,
    /// Packets of the video stream read so far (against the container's frame count at the end).
    packets: i64,
    flushing: bool,
    last_time: Option<f64>,
    times: Vec<f64>,
    fps: f64,
}

impl Drop for Clip {
    fn drop(&mut self) {
        // SAFETY: each pointer is null or owned by this clip; the free functions accept null.
        unsafe {
            sws_freeContext(self.scaler);
            av_frame_free(&mut self.rgb);
            av_frame_free(&mut self.frame);
            av_packet_free(&mut self.packet);
            avcodec_free_context(&mut self.decoder);
            if !self.format.is_null() {
                // With AVFMT_FLAG_CUSTOM_IO the AVIOContext stays ours to free.
                let mut pb = (*self.format).pb;
                avformat_close_input(&mut self.format);
                if !pb.is_null() {
                    av_freep(&mut (*pb).buffer as *mut *mut u8 as *mut c_void);
                    avio_context_free(&mut pb);
                }
            }
        }
    }
}

fn rational(r: AVRational) -> f64 {
    if r.den == 0 {
        0.0
    } else {
        r.num as f64 / r.den as f64
    }
}

impl Clip {
    unsafe fn open(
        data: *const u8,
        len: usize,
        threads: u32,
        info: &mut VpfInfo,
    ) -> Result<Box<Clip>, Failure> {
        if len == 0 {
            return fail(KIND_EMPTY, "zero-byte file");
        }
        let mut clip = Box::new(Clip {
            reader: Box::new(Reader { data, len, pos: 0 }),
            format: ptr::null_mut(),
            stream: -1,
            time_base: 0.0,
            decoder: ptr::null_mut(),
            packet: av_packet_alloc(),
            frame: av_frame_alloc(),
            rgb: av_frame_alloc(),
            scaler: ptr::null_mut(),
            scaler_for: None,
            size: None,
            packets: 0,
            flushing: false,
            last_time: None,
            times: Vec::new(),
            fps: 0.0,
        });
        let buffer = av_malloc(IO_BUFFER) as *mut u8;
        let opaque = &mut *clip.reader as *mut Reader as *mut c_void;
        let pb = avio_alloc_context(
            buffer,
            IO_BUFFER as c_int,
            0,
            opaque,
            Some(read_packet),
            None,
            Some(seek),
        );
        let mut format = avformat_alloc_context();
        if buffer.is_null() || pb.is_null() || format.is_null() || clip.packet.is_null() {
            return fail(KIND_CORRUPT, "out of memory opening the clip");
        }
        (*format).pb = pb;
        (*format).flags |= AVFMT_FLAG_CUSTOM_IO;
        let ret = avformat_open_input(&mut format, ptr::null(), ptr::null(), ptr::null_mut());
        if ret < 0 {
            // avformat_open_input freed `format` but not our AVIOContext.
            let mut pb = pb;
            av_freep(&mut (*pb).buffer as *mut *mut u8 as *mut c_void);
            avio_context_free(&mut pb);
            return fail(
                KIND_CORRUPT,
                format!("not a container FFmpeg can read: {}", av_error(ret)),
            );
        }
        clip.format = format;
        let ret = avformat_find_stream_info(format, ptr::null_mut());
        if ret < 0 {
            return fail(
                KIND_CORRUPT,
                format!("unreadable streams: {}", av_error(ret)),
            );
        }
        let mut codec: *const AVCodec = ptr::null();
        let index = av_find_best_stream(
            format,
            AVMediaType::AVMEDIA_TYPE_VIDEO,
            -1,
            -1,
            &mut codec,
            0,
        );
        let attached = index >= 0
            && (*(*(*format).streams.add(index as usize))).disposition
                & AV_DISPOSITION_ATTACHED_PIC
                != 0;
        if index == AVERROR_STREAM_NOT_FOUND || attached {
            return fail(
                KIND_UNSUPPORTED,
                "no video stream (audio only, or only a cover picture)",
            );
        }
        let stream = *(*format).streams.add(index.max(0) as usize);
        let params = (*stream).codecpar;
        if index == AVERROR_DECODER_NOT_FOUND || codec.is_null() {
            let name = CStr::from_ptr(avcodec_get_name((*params).codec_id)).to_string_lossy();
            return fail(
                KIND_UNSUPPORTED,
                format!("video codec {name}: this FFmpeg has no decoder for it"),
            );
        }
        if index < 0 {
            return fail(
                KIND_CORRUPT,
                format!("no usable video stream: {}", av_error(index)),
            );
        }
        clip.stream = index;
        clip.time_base = rational((*stream).time_base);
        clip.fps = rational((*stream).avg_frame_rate);
        if clip.fps <= 0.0 {
            clip.fps = rational((*stream).r_frame_rate);
        }
        // The demuxer skips the other streams' packets (audio is ignored).
        for i in 0..(*format).nb_streams as usize {
            if i != index as usize {
                (*(*(*format).streams.add(i))).discard = AVDiscard::AVDISCARD_ALL;
            }
        }
        clip.decoder = avcodec_alloc_context3(codec);
        if clip.decoder.is_null() {
            return fail(KIND_CORRUPT, "out of memory opening the decoder");
        }
        let ret = avcodec_parameters_to_context(clip.decoder, params);
        if ret < 0 {
            return fail(
                KIND_CORRUPT,
                format!("decoder parameters: {}", av_error(ret)),
            );
        }
        (*clip.decoder).thread_count = threads as c_int;
        (*clip.decoder).pkt_timebase = (*stream).time_base;
        let ret = avcodec_open2(clip.decoder, codec, ptr::null_mut());
        if ret < 0 {
            let name = CStr::from_ptr((*codec).name).to_string_lossy();
            return fail(
                KIND_UNSUPPORTED,
                format!("cannot open the {name} decoder: {}", av_error(ret)),
            );
        }
        let mut codec = [0u8; CODEC_LEN];
        let name = CStr::from_ptr(avcodec_get_name((*params).codec_id)).to_bytes();
        let n = name.len().min(CODEC_LEN - 1);
        codec[..n].copy_from_slice(&name[..n]);
        *info = VpfInfo {
            width: (*params).width.max(0) as u32,
            height: (*params).height.max(0) as u32,
            rotation: clip.rotation(),
            fps: clip.fps,
            codec,
        };
        Ok(clip)
    }

    fn stream_ptr(&self) -> *mut AVStream {
        // SAFETY: `stream` is a valid index of the open format context.
        unsafe { *(*self.format).streams.add(self.stream as usize) }
    }

    /// Clockwise degrees from the stream's display matrix, as the `ffmpeg` CLI's autorotate reads
    /// it (`-av_display_rotation_get`, the nearest quarter turn); flips are not applied.
    unsafe fn rotation(&self) -> u32 {
        let mut size = 0usize;
        let matrix = av_stream_get_side_data(
            self.stream_ptr(),
            AVPacketSideDataType::AV_PKT_DATA_DISPLAYMATRIX,
            &mut size,
        );
        if matrix.is_null() || size < 9 * 4 {
            return 0;
        }
        let ccw = av_display_rotation_get(matrix as *const i32);
        if !ccw.is_finite() {
            return 0;
        }
        let quarter = (-ccw / 90.0).round() as i64;
        (quarter.rem_euclid(4) * 90) as u32
    }

    /// The demux pass: every packet's presentation time, sorted into display order.
    unsafe fn times(&mut self) -> Result<&[f64], Failure> {
        let mut times = Vec::new();
        loop {
            let ret = av_read_frame(self.format, self.packet);
            if ret == AVERROR_EOF {
                break;
            }
            if ret < 0 {
                return fail(
                    KIND_CORRUPT,
                    format!("unreadable after {} frames: {}", times.len(), av_error(ret)),
                );
            }
            let p = &*self.packet;
            if p.stream_index == self.stream {
                self.packets += 1;
            }
            if p.stream_index == self.stream && p.flags & AV_PKT_FLAG_DISCARD == 0 {
                if p.flags & AV_PKT_FLAG_CORRUPT != 0 {
                    av_packet_unref(self.packet);
                    return fail(
                        KIND_CORRUPT,
                        format!("frame {} is damaged (truncated file?)", times.len()),
                    );
                }
                let ts = if p.pts != AV_NOPTS_VALUE {
                    p.pts
                } else {
                    p.dts
                };
                times.push(ts);
            }
            av_packet_unref(self.packet);
        }
        self.check_count()?;
        if times.is_empty() {
            return fail(KIND_EMPTY, "the video stream has no frames");
        }
        let fps = if self.fps > 0.0 { self.fps } else { 25.0 };
        let known = times.iter().all(|&t| t != AV_NOPTS_VALUE);
        self.times = if known {
            times.sort_unstable();
            times.iter().map(|&t| t as f64 * self.time_base).collect()
        } else {
            (0..times.len()).map(|i| i as f64 / fps).collect()
        };
        Ok(&self.times)
    }

    /// A container that lists more frames than could be read was cut short (a truncated MP4
    /// still has its whole index when it was written with `+faststart`).
    unsafe fn check_count(&self) -> Result<(), Failure> {
        let listed = (*self.stream_ptr()).nb_frames;
        if listed > self.packets {
            return fail(
                KIND_CORRUPT,
                format!(
                    "truncated: the container lists {listed} frames, {} are readable",
                    self.packets
                ),
            );
        }
        Ok(())
    }

    /// The next decoded frame (`Ok(false)` at the end).
    unsafe fn next_frame(&mut self, out: &mut VpfFrame) -> Result<bool, Failure> {
        loop {
            let ret = avcodec_receive_frame(self.decoder, self.frame);
            if ret == 0 {
                let result = self.convert(out);
                av_frame_unref(self.frame);
                return result.map(|_| true);
            }
            if ret == AVERROR_EOF {
                return Ok(false);
            }
            if ret != AVERROR(libc::EAGAIN) {
                return fail(
                    KIND_CORRUPT,
                    format!("undecodable frame: {}", av_error(ret)),
                );
            }
            if self.flushing {
                return Ok(false);
            }
            let ret = av_read_frame(self.format, self.packet);
            if ret == AVERROR_EOF {
                self.check_count()?;
                self.flushing = true;
                avcodec_send_packet(self.decoder, ptr::null());
                continue;
            }
            if ret < 0 {
                return fail(
                    KIND_CORRUPT,
                    format!("unreadable packet: {}", av_error(ret)),
                );
            }
            if (*self.packet).stream_index != self.stream {
                av_packet_unref(self.packet);
                continue;
            }
            self.packets += 1;
            if (*self.packet).flags & AV_PKT_FLAG_CORRUPT != 0 {
                av_packet_unref(self.packet);
                return fail(KIND_CORRUPT, "a damaged frame (truncated file?)");
            }
            let ret = avcodec_send_packet(self.decoder, self.packet);
            av_packet_unref(self.packet);
            if ret < 0 && ret != AVERROR(libc::EAGAIN) {
                return fail(
                    KIND_CORRUPT,
                    format!("undecodable frame: {}", av_error(ret)),
                );
            }
        }
    }

    /// The decoded frame as RGB24, with the source's colour matrix and range.
    unsafe fn convert(&mut self, out: &mut VpfFrame) -> Result<(), Failure> {
        let f = &*self.frame;
        if f.flags & AV_FRAME_FLAG_CORRUPT != 0 || f.decode_error_flags != 0 {
            return fail(KIND_CORRUPT, "a frame decoded with errors (damaged data)");
        }
        let size = (f.width, f.height);
        if *self.size.get_or_insert(size) != size {
            let (w, h) = self.size.unwrap_or(size);
            return fail(
                KIND_UNSUPPORTED,
                format!(
                    "the picture size changes midway ({w}x{h} to {}x{}): not supported",
                    f.width, f.height
                ),
            );
        }
        // SAFETY: frames from a decoder carry a valid AVPixelFormat value.
        let format: AVPixelFormat = std::mem::transmute(f.format);
        let full_range = f.color_range == AVColorRange::AVCOL_RANGE_JPEG
            || matches!(
                format,
                AVPixelFormat::AV_PIX_FMT_YUVJ420P
                    | AVPixelFormat::AV_PIX_FMT_YUVJ422P
                    | AVPixelFormat::AV_PIX_FMT_YUVJ444P
            );
        // An unspecified matrix is BT.601, as swscale (and PyAV, and the `ffmpeg` CLI) assume.
        let space = if f.colorspace == AVColorSpace::AVCOL_SPC_UNSPECIFIED {
            AVColorSpace::AVCOL_SPC_BT470BG
        } else {
            f.colorspace
        } as c_int;
        let key = (f.width, f.height, f.format, space, full_range);
        if self.scaler_for != Some(key) {
            self.scaler = sws_getCachedContext(
                self.scaler,
                f.width,
                f.height,
                format,
                f.width,
                f.height,
                AVPixelFormat::AV_PIX_FMT_RGB24,
                SWS_BILINEAR,
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null(),
            );
            if self.scaler.is_null() {
                let name = av_get_pix_fmt_name(format);
                let name = if name.is_null() {
                    "?".into()
                } else {
                    CStr::from_ptr(name).to_string_lossy()
                };
                return fail(
                    KIND_UNSUPPORTED,
                    format!("pixel format {name}: no conversion to RGB"),
                );
            }
            sws_setColorspaceDetails(
                self.scaler,
                sws_getCoefficients(space),
                full_range as c_int,
                sws_getCoefficients(AVColorSpace::AVCOL_SPC_BT470BG as c_int),
                1,
                0,
                1 << 16,
                1 << 16,
            );
            self.scaler_for = Some(key);
        }
        let rgb = &mut *self.rgb;
        if rgb.width != f.width || rgb.height != f.height {
            av_frame_unref(self.rgb);
            rgb.width = f.width;
            rgb.height = f.height;
            rgb.format = AVPixelFormat::AV_PIX_FMT_RGB24 as c_int;
            let ret = av_frame_get_buffer(self.rgb, 32);
            if ret < 0 {
                return fail(KIND_CORRUPT, format!("frame buffer: {}", av_error(ret)));
            }
        }
        sws_scale(
            self.scaler,
            f.data.as_ptr() as *const *const u8,
            f.linesize.as_ptr(),
            0,
            f.height,
            rgb.data.as_ptr(),
            rgb.linesize.as_ptr(),
        );
        let ts = if f.best_effort_timestamp != AV_NOPTS_VALUE {
            f.best_effort_timestamp
        } else {
            f.pts
        };
        let time = if ts != AV_NOPTS_VALUE {
            ts as f64 * self.time_base
        } else {
            let step = if self.fps > 0.0 { 1.0 / self.fps } else { 0.04 };
            self.last_time.map_or(0.0, |t| t + step)
        };
        self.last_time = Some(time);
        *out = VpfFrame {
            width: f.width as u32,
            height: f.height as u32,
            stride: rgb.linesize[0] as usize,
            data: rgb.data[0],
            time,
        };
        Ok(())
    }
}

fn report(err: *mut VpfError, failure: Failure) {
    if err.is_null() {
        return;
    }
    // SAFETY: the caller hands a writable VpfError.
    let err = unsafe { &mut *err };
    err.kind = failure.kind;
    let bytes = failure.message.as_bytes();
    let mut n = bytes.len().min(MESSAGE_LEN - 1);
    while !failure.message.is_char_boundary(n) {
        n -= 1;
    }
    err.message[..n].copy_from_slice(&bytes[..n]);
    err.message[n] = 0;
}

fn guarded<T>(err: *mut VpfError, on_error: T, f: impl FnOnce() -> Result<T, Failure>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(failure)) => {
            report(err, failure);
            on_error
        }
        Err(_) => {
            report(
                err,
                Failure {
                    kind: KIND_CORRUPT,
                    message: "the FFmpeg plugin panicked on this clip".into(),
                },
            );
            on_error
        }
    }
}

/// [`ABI_VERSION`], checked by the loader before anything else.
#[no_mangle]
pub extern "C" fn vpf_abi_version() -> u32 {
    ABI_VERSION
}

/// The FFmpeg libraries loaded at run time, as `libavcodec 59.37.100, …` (static text).
#[no_mangle]
pub extern "C" fn vpf_ffmpeg_versions() -> *const c_char {
    static TEXT: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();
    let text = TEXT.get_or_init(|| {
        let v = |n: u32| format!("{}.{}.{}", n >> 16, (n >> 8) & 0xff, n & 0xff);
        // SAFETY: version queries with no arguments.
        let (codec, format, scale, util) = unsafe {
            (
                avcodec_version(),
                avformat_version(),
                swscale_version(),
                avutil_version(),
            )
        };
        std::ffi::CString::new(format!(
            "libavcodec {}, libavformat {}, libswscale {}, libavutil {}",
            v(codec),
            v(format),
            v(scale),
            v(util)
        ))
        .unwrap_or_default()
    });
    text.as_ptr()
}

/// Opens a clip over `len` bytes at `data`, which must stay valid until `vpf_close`, and
/// describes its video stream in `info`. `threads`: the decoder's threads, 0 for FFmpeg's choice.
/// Null on failure (`err` says why).
///
/// # Safety
/// `data` points to `len` readable bytes; `info` is writable; `err` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn vpf_open(
    data: *const u8,
    len: usize,
    threads: u32,
    info: *mut VpfInfo,
    err: *mut VpfError,
) -> *mut Clip {
    guarded(err, ptr::null_mut(), || {
        Clip::open(data, len, threads, &mut *info).map(Box::into_raw)
    })
}

/// The demux pass over a freshly opened clip (instead of decoding it): `*times` points to
/// `*n` presentation times in seconds, display order, owned by the clip until `vpf_close`.
/// 0 on success, -1 on failure.
///
/// # Safety
/// `clip` comes from `vpf_open`; `times`, `n` are writable; `err` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn vpf_times(
    clip: *mut Clip,
    times: *mut *const f64,
    n: *mut usize,
    err: *mut VpfError,
) -> c_int {
    guarded(err, -1, || {
        let found = (*clip).times()?;
        *times = found.as_ptr();
        *n = found.len();
        Ok(0)
    })
}

/// The next frame: 1 when `frame` was filled, 0 at the end, -1 on failure.
///
/// # Safety
/// `clip` comes from `vpf_open`; `frame` is writable; `err` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn vpf_next_frame(
    clip: *mut Clip,
    frame: *mut VpfFrame,
    err: *mut VpfError,
) -> c_int {
    guarded(err, -1, || {
        (*clip).next_frame(&mut *frame).map(|more| more as c_int)
    })
}

/// Frees the clip and everything it owns.
///
/// # Safety
/// `clip` comes from `vpf_open` (or is null) and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn vpf_close(clip: *mut Clip) {
    if !clip.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(clip))));
    }
}
