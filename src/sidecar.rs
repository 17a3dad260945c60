//! JSON metadata columns: takes each sample's JSON object (a `NAME.json` sidecar beside an
//! image), hands on one run-wide schema of their scalar fields (inferred before any work, so
//! every shard has the same columns) and each row's values in that schema.

use std::collections::BTreeMap;

use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
use arrow_schema::DataType;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The inferred type of one field: the narrowest that holds every value seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SidecarSchema {
    pub fields: Vec<(String, String, FieldType)>,
}

impl SidecarSchema {
    /// Takes every sample's metadata once; malformed or non-object metadata is counted and
    /// contributes nothing.
    pub fn infer(objects: impl Iterator<Item = crate::source::MetadataRead>) -> (Self, usize) {
        use crate::source::MetadataRead;
        let mut types: BTreeMap<String, FieldType> = BTreeMap::new();
        let mut unreadable = 0;
        for object in objects {
            let map = match object {
                MetadataRead::Absent => continue,
                MetadataRead::Unreadable => {
                    unreadable += 1;
                    continue;
                }
                MetadataRead::Object(map) => map,
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
                let column = if crate::format::is_format_column(&field) {
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

    /// The columns' names and Arrow types, in schema order.
    pub fn columns(&self) -> Vec<(String, DataType)> {
        self.fields
            .iter()
            .map(|(c, _, t)| (c.clone(), t.data_type()))
            .collect()
    }

    /// A row's values from its JSON object, in schema order; None where it lacks the field.
    pub fn values(&self, object: Option<&serde_json::Map<String, Value>>) -> Vec<Option<Scalar>> {
        if self.fields.is_empty() {
            return Vec::new();
        }
        let empty = serde_json::Map::new();
        let map = object.unwrap_or(&empty);
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

/// One metadata column from the rows' values; a value of another type than the column's is
/// null (the schema was inferred to hold them all, so this only happens for missing fields).
pub fn column_array(
    values: impl Iterator<Item = Option<Scalar>>,
    data_type: &DataType,
) -> ArrayRef {
    match data_type {
        DataType::Boolean => Arc::new(
            values
                .map(|v| match v {
                    Some(Scalar::Bool(b)) => Some(b),
                    _ => None,
                })
                .collect::<BooleanArray>(),
        ),
        DataType::Int64 => Arc::new(
            values
                .map(|v| match v {
                    Some(Scalar::Int(i)) => Some(i),
                    _ => None,
                })
                .collect::<Int64Array>(),
        ),
        DataType::Float64 => Arc::new(
            values
                .map(|v| match v {
                    Some(Scalar::Float(f)) => Some(f),
                    _ => None,
                })
                .collect::<Float64Array>(),
        ),
        _ => Arc::new(
            values
                .map(|v| match v {
                    Some(Scalar::Text(t)) => Some(t),
                    _ => None,
                })
                .collect::<StringArray>(),
        ),
    }
}
