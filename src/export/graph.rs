//! An ONNX graph builder for the few ops a VAE needs (opset 17, which ONNX Runtime 1.22+ runs
//! everywhere). Takes weights as f32, hands on a `ModelProto`: weights as initializers in the
//! export dtype, everything else as `Constant` nodes, so the initializers are exactly the
//! checkpoint's parameters.

use half::f16;
use prost::Message;

use super::onnx_pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

/// ONNX opset of the exported graphs.
pub const OPSET: i64 = 17;
/// IR version that goes with opset 17.
const IR_VERSION: i64 = 8;

/// Element type of weights and I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDType {
    F32,
    F16,
}

impl ExportDType {
    fn onnx(self) -> DataType {
        match self {
            ExportDType::F32 => DataType::Float,
            ExportDType::F16 => DataType::Float16,
        }
    }
}

/// One dimension of a graph input or output.
pub enum Dim {
    Fixed(usize),
    Named(&'static str),
    /// Dynamic and unrelated to any other dim (a carried cache's height at some depth).
    Any,
}

/// A graph under construction. Values are named by strings, as in ONNX.
pub struct Graph {
    dtype: ExportDType,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    next_id: usize,
}

impl Graph {
    pub fn new(dtype: ExportDType) -> Self {
        Graph {
            dtype,
            nodes: Vec::new(),
            initializers: Vec::new(),
            next_id: 0,
        }
    }

    /// A weight from the checkpoint, stored in the export dtype under its diffusers name.
    pub fn weight(&mut self, name: &str, shape: &[usize], values: &[f32]) -> String {
        let raw_data = match self.dtype {
            ExportDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ExportDType::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        self.initializers.push(TensorProto {
            name: Some(name.to_string()),
            dims: shape.iter().map(|&d| d as i64).collect(),
            data_type: Some(self.dtype.onnx() as i32),
            raw_data: Some(raw_data),
            ..Default::default()
        });
        name.to_string()
    }

    fn fresh(&mut self, op: &str) -> String {
        self.next_id += 1;
        format!("{op}_{}", self.next_id)
    }

    /// Adds a node with one output and returns the output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.nodes.push(NodeProto {
            name: Some(out.clone()),
            op_type: Some(op.to_string()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            attribute: attributes,
            ..Default::default()
        });
        out
    }

    fn constant(&mut self, tensor: TensorProto) -> String {
        self.node(
            "Constant",
            &[],
            vec![AttributeProto {
                name: Some("value".into()),
                r#type: Some(AttributeType::Tensor as i32),
                t: Some(tensor),
                ..Default::default()
            }],
        )
    }

    /// An int64 constant (shapes, axes).
    pub fn ints(&mut self, values: &[i64]) -> String {
        self.constant(TensorProto {
            dims: vec![values.len() as i64],
            data_type: Some(DataType::Int64 as i32),
            int64_data: values.to_vec(),
            ..Default::default()
        })
    }

    /// A float constant of `shape`, in f32 or the export dtype.
    pub fn floats(&mut self, shape: &[usize], values: &[f32], dtype: ExportDType) -> String {
        let raw_data = match dtype {
            ExportDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ExportDType::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        self.constant(TensorProto {
            dims: shape.iter().map(|&d| d as i64).collect(),
            data_type: Some(dtype.onnx() as i32),
            raw_data: Some(raw_data),
            ..Default::default()
        })
    }

    pub fn dtype(&self) -> ExportDType {
        self.dtype
    }

    /// Casts `x` to `to`.
    pub fn cast(&mut self, x: &str, to: ExportDType) -> String {
        self.node("Cast", &[x], vec![int("to", to.onnx() as i64)])
    }

    /// A tensor of zeros in the export dtype whose shape is the int64 tensor `shape`.
    pub fn zeros(&mut self, shape: &str) -> String {
        let zero = match self.dtype {
            ExportDType::F32 => 0f32.to_le_bytes().to_vec(),
            ExportDType::F16 => f16::ZERO.to_le_bytes().to_vec(),
        };
        let value = TensorProto {
            dims: vec![1],
            data_type: Some(self.dtype.onnx() as i32),
            raw_data: Some(zero),
            ..Default::default()
        };
        self.node(
            "ConstantOfShape",
            &[shape],
            vec![AttributeProto {
                name: Some("value".into()),
                r#type: Some(AttributeType::Tensor as i32),
                t: Some(value),
                ..Default::default()
            }],
        )
    }

    /// The finished model with one input and one output.
    pub fn finish(
        self,
        name: &str,
        input: (&str, &[Dim]),
        output: (&str, &[Dim]),
        last: &str,
    ) -> ModelProto {
        self.finish_many(name, &[input], &[(output.0, output.1, last)])
    }

    /// The finished model with several inputs and outputs; each output is (name, dims, the
    /// value it is).
    pub fn finish_many(
        self,
        name: &str,
        inputs: &[(&str, &[Dim])],
        outputs: &[(&str, &[Dim], &str)],
    ) -> ModelProto {
        let mut nodes = self.nodes;
        for (out, _, last) in outputs {
            nodes.push(NodeProto {
                name: Some(out.to_string()),
                op_type: Some("Identity".into()),
                input: vec![last.to_string()],
                output: vec![out.to_string()],
                ..Default::default()
            });
        }
        let value_info = |(name, dims): (&str, &[Dim])| ValueInfoProto {
            name: Some(name.to_string()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(self.dtype.onnx() as i32),
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|d| tensor_shape_proto::Dimension {
                                value: match d {
                                    Dim::Fixed(n) => Some(
                                        tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                                    ),
                                    Dim::Named(s) => {
                                        Some(tensor_shape_proto::dimension::Value::DimParam(
                                            s.to_string(),
                                        ))
                                    }
                                    Dim::Any => None,
                                },
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        ModelProto {
            ir_version: Some(IR_VERSION),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(OPSET),
            }],
            producer_name: Some("vae-pipeline".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            graph: Some(GraphProto {
                name: Some(name.to_string()),
                node: nodes,
                initializer: self.initializers,
                input: inputs.iter().map(|&i| value_info(i)).collect(),
                output: outputs
                    .iter()
                    .map(|&(n, d, _)| value_info((n, d)))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The protobuf bytes of `model`.
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

pub fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

pub fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

pub fn float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(value),
        ..Default::default()
    }
}

pub fn string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(value.as_bytes().to_vec()),
        ..Default::default()
    }
}
