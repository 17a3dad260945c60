//! The shard format: the one home of the contract between a run and every reader of its output
//! (FORMAT.md publishes it). Names the folder layout, the side files, the columns and their types,
//! the tensor codec (`arrow.fixed_shape_tensor`) and the file metadata as one typed struct with a
//! format version. Writer, resume, verify, inspect and report all go through it; it reads through
//! `store` (a folder or an object-store prefix) and imports nothing else of the pipeline.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::{Array, ArrayRef, FixedSizeListArray, Float16Array, Float32Array, UInt16Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

pub use crate::layout::{
    done_marker, is_shard_name, is_tmp_name, is_tmp_of, parse_shape_dir, relative, shape_dir_name,
    tmp_name, InputShape, Scope, CONFIG, ERRORS, LOCK, MANIFEST, PARTITIONS, PLAN, RUNS, SUCCESS,
};
use crate::store::{ShardStore, StoreFile};

/// The version of this contract. A reader refuses a set with a higher major version; a writer
/// resumes only a set of its own version. 2: `identity` replaces the whole config in the
/// metadata, keys escape `%` and non-UTF-8 bytes.
pub const FORMAT_VERSION: u32 = 2;

/// Prefix of every metadata key the format owns.
pub const META_PREFIX: &str = "vae_pipeline.";

pub const KEY: &str = "key";
pub const SOURCE_SHA256: &str = "source_sha256";
pub const CAPTION: &str = "caption";
/// The Int32 columns recording each row's geometry, in schema order.
pub const GEOMETRY_COLUMNS: [&str; 6] = [
    "orig_width",
    "orig_height",
    "crop_top",
    "crop_left",
    "width",
    "height",
];
/// What a clip set records about each row's window of frames, after the geometry columns:
/// the window's first frame and frame count (musubi's item key), the source frames it holds,
/// the clip's frame rate and the rate the window was sampled at.
pub const FRAME_START: &str = "frame_start";
pub const FRAME_COUNT: &str = "frame_count";
pub const FRAME_INDICES: &str = "frame_indices";
pub const SOURCE_FPS: &str = "source_fps";
pub const FPS: &str = "fps";
pub const CLIP_COLUMNS: [&str; 5] = [FRAME_START, FRAME_COUNT, FRAME_INDICES, SOURCE_FPS, FPS];
/// The tensor columns, in schema order; all but `latent` are present only when asked for.
pub const TENSOR_COLUMNS: [&str; 4] = ["latent", "latent_std", "latent_flip", "latent_flip_std"];

/// Whether the format owns a column of this name (metadata columns must not take it).
pub fn is_format_column(name: &str) -> bool {
    [KEY, SOURCE_SHA256, CAPTION].contains(&name)
        || GEOMETRY_COLUMNS.contains(&name)
        || TENSOR_COLUMNS.contains(&name)
        || CLIP_COLUMNS.contains(&name)
}

/// How latent values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StorageDType {
    F16,
    /// Arrow has no bfloat16: the bits are stored as uint16 (see FORMAT.md).
    Bf16,
    F32,
}

impl StorageDType {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageDType::F16 => "f16",
            StorageDType::Bf16 => "bf16",
            StorageDType::F32 => "f32",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [StorageDType::F16, StorageDType::Bf16, StorageDType::F32]
            .into_iter()
            .find(|d| d.as_str() == text)
    }

    pub fn bytes(self) -> usize {
        match self {
            StorageDType::F32 => 4,
            StorageDType::F16 | StorageDType::Bf16 => 2,
        }
    }

    /// The Arrow element type the values are written as (bf16 travels as its uint16 bits).
    pub fn element_type(self) -> DataType {
        match self {
            StorageDType::F16 => DataType::Float16,
            StorageDType::Bf16 => DataType::UInt16,
            StorageDType::F32 => DataType::Float32,
        }
    }
}

/// A `arrow.fixed_shape_tensor` field. Its list child must be nullable or pyarrow reads a plain
/// fixed-size list; the metadata is written by hand because arrow-rs' own writes JSON nulls that
/// pyarrow rejects (see FACTS.md).
pub fn tensor_field(name: &str, dtype: StorageDType, shape: &[usize]) -> Field {
    let item = Field::new("item", dtype.element_type(), true);
    let len = shape.iter().product::<usize>() as i32;
    Field::new(name, DataType::FixedSizeList(Arc::new(item), len), false).with_metadata(
        [
            (
                "ARROW:extension:name".to_string(),
                "arrow.fixed_shape_tensor".to_string(),
            ),
            (
                "ARROW:extension:metadata".to_string(),
                format!(
                    "{{\"shape\":[{}]}}",
                    shape
                        .iter()
                        .map(usize::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ),
        ]
        .into_iter()
        .collect::<HashMap<_, _>>(),
    )
}

/// Latent values (row-major, rows × the shape's product) as a tensor column.
pub fn tensor_array(values: Vec<f32>, dtype: StorageDType, shape: &[usize]) -> ArrayRef {
    let item = Arc::new(Field::new("item", dtype.element_type(), true));
    let child: ArrayRef = match dtype {
        StorageDType::F16 => Arc::new(Float16Array::from_iter_values(
            values.iter().map(|&v| half::f16::from_f32(v)),
        )),
        StorageDType::Bf16 => Arc::new(UInt16Array::from_iter_values(
            values.iter().map(|&v| half::bf16::from_f32(v).to_bits()),
        )),
        StorageDType::F32 => Arc::new(Float32Array::from(values)),
    };
    let len = shape.iter().product::<usize>() as i32;
    Arc::new(FixedSizeListArray::new(item, len, child, None))
}

/// Whether `field` is a `arrow.fixed_shape_tensor` column.
pub fn is_tensor_field(field: &Field) -> bool {
    field
        .metadata()
        .get("ARROW:extension:name")
        .map(String::as_str)
        == Some("arrow.fixed_shape_tensor")
}

/// `[C, h, w]` (images) or `[C, T, h, w]` (clips) from a tensor field's extension metadata.
pub fn tensor_shape(field: &Field) -> Result<Vec<usize>> {
    let meta = field
        .metadata()
        .get("ARROW:extension:metadata")
        .with_context(|| {
            format!(
                "column `{}` has no arrow.fixed_shape_tensor metadata",
                field.name()
            )
        })?;
    let parsed: serde_json::Value = serde_json::from_str(meta)?;
    let dims: Vec<usize> = parsed["shape"]
        .as_array()
        .context("tensor metadata has no shape")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .context("tensor shape is not a list of sizes")?;
    if !(3..=4).contains(&dims.len()) {
        bail!("latent shape {dims:?} is not [C, h, w] or [C, T, h, w]");
    }
    Ok(dims)
}

/// Stored tensor values widened to f32: float16, float32, or bfloat16 bits in uint16.
pub fn widen(values: &dyn Array, dtype: StorageDType) -> Result<Vec<f32>> {
    let any = values.as_any();
    match dtype {
        StorageDType::F32 => {
            if let Some(a) = any.downcast_ref::<Float32Array>() {
                return Ok(a.values().to_vec());
            }
        }
        StorageDType::F16 => {
            if let Some(a) = any.downcast_ref::<Float16Array>() {
                return Ok(a.values().iter().map(|v| v.to_f32()).collect());
            }
        }
        StorageDType::Bf16 => {
            if let Some(a) = any.downcast_ref::<UInt16Array>() {
                return Ok(a
                    .values()
                    .iter()
                    .map(|&b| half::bf16::from_bits(b).to_f32())
                    .collect());
            }
        }
    }
    bail!(
        "latent values are {} but the shard's dtype is {}",
        values.data_type(),
        dtype.as_str()
    )
}

/// How many stored tensor values are NaN or Inf; None for an element type latents are not
/// stored as.
pub fn non_finite(values: &dyn Array) -> Option<usize> {
    let any = values.as_any();
    if let Some(a) = any.downcast_ref::<Float16Array>() {
        return Some(a.values().iter().filter(|v| !v.is_finite()).count());
    }
    if let Some(a) = any.downcast_ref::<Float32Array>() {
        return Some(a.values().iter().filter(|v| !v.is_finite()).count());
    }
    any.downcast_ref::<UInt16Array>().map(|a| {
        a.values()
            .iter()
            .filter(|&&b| !half::bf16::from_bits(b).is_finite())
            .count()
    })
}

/// Which optional tensor columns a shard set carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TensorColumns {
    /// `latent_std` (`--latent-mode dist`).
    pub std: bool,
    /// `latent_flip` (`--flip`), and `latent_flip_std` with `std`.
    pub flip: bool,
}

/// The schema of every shard in a set: key, source hash, geometry, tensors, caption, then the
/// run's metadata columns (nullable). `metadata` is also embedded in the Arrow schema, so
/// `pyarrow.parquet.read_schema(f).metadata` shows it as well as the Parquet footer does.
pub fn schema(
    dtype: StorageDType,
    latent_shape: &[usize],
    tensors: TensorColumns,
    extra: &[(String, DataType)],
    metadata: &ShardMetadata,
) -> SchemaRef {
    let mut fields = vec![
        Field::new(KEY, DataType::Utf8, false),
        Field::new(SOURCE_SHA256, DataType::FixedSizeBinary(32), false),
    ];
    for name in GEOMETRY_COLUMNS {
        fields.push(Field::new(name, DataType::Int32, false));
    }
    if latent_shape.len() == 4 {
        fields.extend(clip_fields());
    }
    let present = [true, tensors.std, tensors.flip, tensors.flip && tensors.std];
    for (name, _) in TENSOR_COLUMNS.iter().zip(present).filter(|t| t.1) {
        fields.push(tensor_field(name, dtype, latent_shape));
    }
    fields.push(Field::new(CAPTION, DataType::Utf8, true));
    for (name, data_type) in extra {
        fields.push(Field::new(name, data_type.clone(), true));
    }
    Arc::new(Schema::new(fields).with_metadata(metadata.to_map()))
}

/// The frames one clip row holds (`format::CLIP_COLUMNS`).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowMeta {
    /// First frame and frame count as musubi-tuner names the window (`{start:05}-{count:03}`).
    pub start: i32,
    pub count: i32,
    /// The source frames, in order.
    pub indices: Vec<i32>,
    pub source_fps: f64,
    /// The rate the window was sampled at.
    pub fps: f64,
}

/// What `--dedupe` compares: a row's source bytes, and in a clip set also its window (the
/// windows of one clip share the clip's hash; its key ends in the window, `…/<start>-<count>`).
pub fn content_id(sha256: &[u8; 32], key: &str, clips: bool) -> [u8; 32] {
    if !clips {
        return *sha256;
    }
    let window = key.rsplit_once('/').map_or("", |(_, w)| w);
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(sha256);
    h.update(window.as_bytes());
    h.finalize().into()
}

/// The clip columns (`CLIP_COLUMNS`), present when latents have a time axis.
fn clip_fields() -> [Field; 5] {
    [
        Field::new(FRAME_START, DataType::Int32, false),
        Field::new(FRAME_COUNT, DataType::Int32, false),
        Field::new(
            FRAME_INDICES,
            DataType::List(Arc::new(Field::new("item", DataType::Int32, true))),
            false,
        ),
        Field::new(SOURCE_FPS, DataType::Float64, false),
        Field::new(FPS, DataType::Float64, false),
    ]
}

/// Each column's name, type and nullability as a reader sees them. Writers name a list's child
/// differently (`item` here, `element` in pyarrow's Parquet), which is not a difference.
pub fn column_signature(schema: &Schema) -> Vec<String> {
    schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::FixedSizeList(item, len) => format!(
                "{} fixed_size_list<{}>[{len}] nullable={} tensor={:?}",
                f.name(),
                item.data_type(),
                f.is_nullable(),
                tensor_shape(f).ok()
            ),
            other => format!("{} {other} nullable={}", f.name(), f.is_nullable()),
        })
        .collect()
}

/// The columns after `caption`: the run's metadata columns (JSON sidecar fields).
pub fn extra_columns(schema: &Schema) -> Vec<(String, DataType)> {
    schema
        .fields()
        .iter()
        .skip_while(|f| f.name() != CAPTION)
        .skip(1)
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect()
}

/// What every shard of a set records about how its latents were made (Parquet key-value
/// metadata, `vae_pipeline.<field>`).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardMetadata {
    pub format_version: u32,
    /// The vae-pipeline version that wrote the shard.
    pub tool_version: String,
    pub model: String,
    pub encoder_sha256: String,
    pub scaling_factor: f32,
    pub shift_factor: f32,
    /// Human-readable normalization, e.g. `(z - 0.1159) * 0.3611`.
    pub normalization: String,
    pub latent_mode: String,
    pub dtype: StorageDType,
    /// `<policy> <size>`, e.g. `bucket 1024`.
    pub resize: String,
    /// sha256 of `identity`: equal exactly when two runs give the same latents.
    pub identity_hash: String,
    /// The run identity as TOML: everything that decides the latents, nothing else.
    pub identity: String,
}

impl ShardMetadata {
    const KEYS: [&'static str; 12] = [
        "format_version",
        "version",
        "model",
        "encoder_sha256",
        "scaling_factor",
        "shift_factor",
        "normalization",
        "latent_mode",
        "dtype",
        "resize",
        "identity_hash",
        "identity",
    ];

    fn values(&self) -> [String; 12] {
        [
            self.format_version.to_string(),
            self.tool_version.clone(),
            self.model.clone(),
            self.encoder_sha256.clone(),
            self.scaling_factor.to_string(),
            self.shift_factor.to_string(),
            self.normalization.clone(),
            self.latent_mode.clone(),
            self.dtype.as_str().to_string(),
            self.resize.clone(),
            self.identity_hash.clone(),
            self.identity.clone(),
        ]
    }

    pub fn to_map(&self) -> HashMap<String, String> {
        Self::KEYS
            .iter()
            .zip(self.values())
            .map(|(k, v)| (format!("{META_PREFIX}{k}"), v))
            .collect()
    }

    /// As Parquet key-value pairs, in a fixed order.
    pub fn to_key_values(&self) -> Vec<KeyValue> {
        Self::KEYS
            .iter()
            .zip(self.values())
            .map(|(k, v)| KeyValue::new(format!("{META_PREFIX}{k}"), v))
            .collect()
    }

    /// Parses a shard's key-value metadata; `what` names the shard in errors.
    pub fn from_key_values(kv: &[KeyValue], what: &str) -> Result<Self> {
        let map: HashMap<&str, &str> = kv
            .iter()
            .filter_map(|e| Some((e.key.strip_prefix(META_PREFIX)?, e.value.as_deref()?)))
            .collect();
        let get = |key: &str| -> Result<String> {
            map.get(key).map(|v| v.to_string()).with_context(|| {
                format!(
                    "{what} has no `{META_PREFIX}{key}` metadata: it was not written by `vae-pipeline precompute`"
                )
            })
        };
        let version: u32 = match map.get("format_version") {
            Some(v) => v
                .parse()
                .with_context(|| format!("{what}: format_version {v:?} is not a number"))?,
            None if map.contains_key("config_hash") => 1,
            None => {
                get("format_version")?;
                unreachable!()
            }
        };
        if version != FORMAT_VERSION {
            bail!(
                "{what} is shard format {version}, this vae-pipeline reads format {FORMAT_VERSION}: \
                 rewrite the set with this version (precompute --overwrite)"
            );
        }
        let number = |key: &str| -> Result<f32> {
            let text = get(key)?;
            text.parse()
                .with_context(|| format!("{what}: {META_PREFIX}{key} = {text:?} is not a number"))
        };
        let dtype = get("dtype")?;
        Ok(ShardMetadata {
            format_version: version,
            tool_version: get("version")?,
            model: get("model")?,
            encoder_sha256: get("encoder_sha256")?,
            scaling_factor: number("scaling_factor")?,
            shift_factor: number("shift_factor")?,
            normalization: get("normalization")?,
            latent_mode: get("latent_mode")?,
            dtype: StorageDType::parse(&dtype)
                .with_context(|| format!("{what}: unknown dtype {dtype:?}"))?,
            resize: get("resize")?,
            identity_hash: get("identity_hash")?,
            identity: get("identity")?,
        })
    }
}

/// Writer settings every shard shares: zstd; no dictionary or statistics on tensor columns
/// (dictionaries of floats only cost space); row groups of `group_rows` rows.
pub fn writer_properties(metadata: &ShardMetadata, group_rows: usize) -> Result<WriterProperties> {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_max_row_group_row_count(Some(group_rows.max(1)))
        .set_key_value_metadata(Some(metadata.to_key_values()));
    for column in TENSOR_COLUMNS {
        let path = ColumnPath::from(vec![column.to_string(), "list".into(), "item".into()]);
        props = props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_statistics_enabled(path, EnabledStatistics::None);
    }
    Ok(props.build())
}

/// Row groups are cut at this many bytes of tensor data, so a writer, a reader and a prune hold
/// How a shard's tensor columns are stored (`--latent-compression`): readers need nothing to
/// tell them apart. Latents are noise-like floats: zstd on their bytes saves little, while
/// BYTE_STREAM_SPLIT (each byte position of the values in its own stream) lets zstd find the
/// repeated exponent bytes. `benches/latent_compression.py` measures size and speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum LatentCompression {
    /// `none`: plain values, uncompressed.
    None,
    /// `zstd` or `zstd:LEVEL`: zstd on the plain values (level 3 by default).
    Zstd(i32),
    /// `split-zstd` or `split-zstd:LEVEL`: BYTE_STREAM_SPLIT, then zstd (level 3 by default).
    SplitZstd(i32),
}

impl Default for LatentCompression {
    fn default() -> Self {
        Self::Zstd(3)
    }
}

impl LatentCompression {
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            anyhow::anyhow!(
                "latent compression {text:?}: expected none, zstd, zstd:LEVEL, split-zstd or                  split-zstd:LEVEL (LEVEL 1 to 22)"
            )
        };
        let (name, level) = match text.trim().split_once(':') {
            Some((name, level)) => {
                let level: i32 = level.parse().map_err(|_| bad())?;
                if !(1..=22).contains(&level) {
                    return Err(bad());
                }
                (name, Some(level))
            }
            None => (text.trim(), None),
        };
        match (name, level) {
            ("none", None) => Ok(Self::None),
            ("zstd", level) => Ok(Self::Zstd(level.unwrap_or(3))),
            ("split-zstd", level) => Ok(Self::SplitZstd(level.unwrap_or(3))),
            _ => Err(bad()),
        }
    }

    /// The tensor columns' settings on top of `props` (the other columns keep theirs).
    pub fn apply(self, props: WriterProperties) -> Result<WriterProperties> {
        let (encoding, compression) = match self {
            Self::None => (Encoding::PLAIN, Compression::UNCOMPRESSED),
            Self::Zstd(level) => (
                Encoding::PLAIN,
                Compression::ZSTD(ZstdLevel::try_new(level)?),
            ),
            Self::SplitZstd(level) => (
                Encoding::BYTE_STREAM_SPLIT,
                Compression::ZSTD(ZstdLevel::try_new(level)?),
            ),
        };
        let mut builder = props.into_builder();
        for column in TENSOR_COLUMNS {
            let path = ColumnPath::from(vec![column.to_string(), "list".into(), "item".into()]);
            builder = builder
                .set_column_encoding(path.clone(), encoding)
                .set_column_compression(path, compression);
        }
        Ok(builder.build())
    }
}

impl std::fmt::Display for LatentCompression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => write!(f, "none"),
            Self::Zstd(level) => write!(f, "zstd:{level}"),
            Self::SplitZstd(level) => write!(f, "split-zstd:{level}"),
        }
    }
}

impl TryFrom<String> for LatentCompression {
    type Error = anyhow::Error;
    fn try_from(text: String) -> Result<Self> {
        Self::parse(&text)
    }
}

impl From<LatentCompression> for String {
    fn from(c: LatentCompression) -> String {
        c.to_string()
    }
}

/// at most about this much of a shard at a time.
pub const ROW_GROUP_BYTES: usize = 64 << 20;

/// Rows per row group (and per read batch) for rows of `row_bytes` tensor bytes.
pub fn group_rows(row_bytes: usize, shard_rows: usize) -> usize {
    shard_rows.min((ROW_GROUP_BYTES / row_bytes.max(1)).max(1))
}

/// Tensor bytes of one row of `schema`.
pub fn row_tensor_bytes(schema: &Schema) -> usize {
    schema
        .fields()
        .iter()
        .filter(|f| is_tensor_field(f))
        .map(|f| match f.data_type() {
            DataType::FixedSizeList(item, len) => {
                *len as usize * item.data_type().primitive_width().unwrap_or(4)
            }
            _ => 0,
        })
        .sum()
}

/// What a shard set holds: shard files and anything else in its shape folders (foreign files,
/// which `verify` reports). Names are relative to the set.
pub struct Listing {
    pub shards: Vec<String>,
    pub foreign: Vec<String>,
}

/// Every shard of a set (`<W>x<H>/part-*.parquet`), sorted, and the foreign files beside them.
pub fn list(store: &dyn ShardStore) -> Result<Listing> {
    let mut listing = Listing {
        shards: Vec::new(),
        foreign: Vec::new(),
    };
    for name in store.list()? {
        let Some((dir, file)) = name.split_once('/') else {
            continue;
        };
        if parse_shape_dir(dir).is_none() {
            continue;
        }
        if is_shard_name(file) {
            listing.shards.push(name);
        } else if !is_tmp_name(file) {
            listing.foreign.push(name);
        }
    }
    listing.shards.sort();
    listing.foreign.sort();
    Ok(listing)
}

/// Every shard of a set, sorted.
pub fn shard_files(store: &dyn ShardStore) -> Result<Vec<String>> {
    Ok(list(store)?.shards)
}

/// One shard's footer: schema, metadata and row count, without reading any data.
pub struct Footer {
    pub schema: SchemaRef,
    pub metadata: ShardMetadata,
    pub rows: usize,
}

/// Opens a shard for reading, with a message that names it.
pub fn open(
    store: &dyn ShardStore,
    shard: &str,
) -> Result<ParquetRecordBatchReaderBuilder<StoreFile>> {
    let file = store.open(shard)?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{} is not a readable Parquet file", store.name(shard)))
}

/// Reads a shard's footer.
pub fn footer(store: &dyn ShardStore, shard: &str) -> Result<Footer> {
    footer_of(&open(store, shard)?, &store.name(shard))
}

pub fn footer_of(
    builder: &ParquetRecordBatchReaderBuilder<StoreFile>,
    what: &str,
) -> Result<Footer> {
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    Ok(Footer {
        schema: builder.schema().clone(),
        metadata: ShardMetadata::from_key_values(&kv, what)?,
        rows: builder.metadata().file_metadata().num_rows() as usize,
    })
}
