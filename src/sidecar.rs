//! JSON sidecars: takes the `NAME.json` files beside the input images, hands on one run-wide
//! schema of their scalar fields (inferred before any work, so every shard has the same
//! columns) and each row's values in that schema.

use std::collections::BTreeMap;
use std::path::Path;

use arrow_schema::DataType;
use serde_json::Value;

/// The inferred type of one field: the narrowest that holds every value seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FieldType {
    Bool,
    Int,
    Float,
    Text,
}

impl FieldType {
    fn of(value: &Value) -> Option<Self> {
        match value {
            Value::Bool(_) => Some(FieldType::Bool),
            Value::Number(n) if n.is_i64() => Some(FieldType::Int),
            Value::Number(_) => Some(FieldType::Float),
            Value::String(_) => Some(FieldType::Text),
            Value::Null | Value::Array(_) | Value::Object(_) => None,
        }
    }

    /// Int and Float widen to Float; any other mix becomes Text.
    fn merge(self, other: Self) -> Self {
        match (self, other) {
            (a, b) if a == b => a,
            (FieldType::Int, FieldType::Float) | (FieldType::Float, FieldType::Int) => {
                FieldType::Float
            }
            _ => FieldType::Text,
        }
    }

    pub fn data_type(self) -> DataType {
        match self {
            FieldType::Bool => DataType::Boolean,
            FieldType::Int => DataType::Int64,
            FieldType::Float => DataType::Float64,
            FieldType::Text => DataType::Utf8,
        }
    }
}

/// One value of a row in its column's type.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// The run's sidecar columns: (column name, JSON field, type), sorted by field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SidecarSchema {
    pub fields: Vec<(String, String, FieldType)>,
}

fn object(image: &Path) -> Option<serde_json::Map<String, Value>> {
    let text = std::fs::read_to_string(image.with_extension("json")).ok()?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

impl SidecarSchema {
    /// Reads every image's sidecar once; malformed or non-object sidecars are counted and
    /// contribute nothing.
    pub fn infer<'a>(images: impl Iterator<Item = &'a Path>) -> (Self, usize) {
        let mut types: BTreeMap<String, FieldType> = BTreeMap::new();
        let mut unreadable = 0;
        for image in images {
            if !image.with_extension("json").exists() {
                continue;
            }
            let Some(map) = object(image) else {
                unreadable += 1;
                continue;
            };
            for (field, value) in &map {
                if let Some(t) = FieldType::of(value) {
                    types
                        .entry(field.clone())
                        .and_modify(|old| *old = old.merge(t))
                        .or_insert(t);
                }
            }
        }
        let fields = types
            .into_iter()
            .map(|(field, t)| {
                // A field named like a shard column is stored as `json_<name>`.
                let column = if crate::write::is_shard_column(&field) {
                    format!("json_{field}")
                } else {
                    field.clone()
                };
                (column, field, t)
            })
            .collect();
        (SidecarSchema { fields }, unreadable)
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// A stable description for the config hash: a new field or type is a new config.
    pub fn describe(&self) -> String {
        self.fields
            .iter()
            .map(|(c, _, t)| format!("{c}:{t:?}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The row's values for `image`, in schema order; None where the sidecar lacks the field.
    pub fn values(&self, image: &Path) -> Vec<Option<Scalar>> {
        if self.fields.is_empty() {
            return Vec::new();
        }
        let map = object(image).unwrap_or_default();
        self.fields
            .iter()
            .map(|(_, field, t)| {
                let v = map.get(field)?;
                Some(match (t, v) {
                    (FieldType::Bool, Value::Bool(b)) => Scalar::Bool(*b),
                    (FieldType::Int, Value::Number(n)) => Scalar::Int(n.as_i64()?),
                    (FieldType::Float, Value::Number(n)) => Scalar::Float(n.as_f64()?),
                    (FieldType::Text, Value::String(s)) => Scalar::Text(s.clone()),
                    (FieldType::Text, Value::Null | Value::Array(_) | Value::Object(_)) => {
                        return None
                    }
                    (FieldType::Text, other) => Scalar::Text(other.to_string()),
                    _ => return None,
                })
            })
            .collect()
    }
}
