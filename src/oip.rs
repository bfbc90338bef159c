//! The Open Inference Protocol's gRPC API (`inference.GRPCInferenceService`) as far as
//! sluicegate reads it: the `ModelInfer` messages, gRPC's length-prefixed message framing, and
//! a scanner that finds a request's `model_name` while the request streams through.
//!
//! The message types are written out with `prost`'s derive, field for field as the protocol
//! publishes them (`grpc_predict_v2.proto`: KServe, Triton and MLServer share it), so the build
//! needs no `protoc`. Only what sluicegate decodes is declared; a decided response is never
//! re-encoded from these types (which would drop fields they do not declare): sluicegate
//! appends its output to the message as sent (see [`frame_with_action_tensor`]).

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

/// The path of a unary `ModelInfer` call.
pub const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// The name of the output tensor a route with `write_decisions` appends (as on REST).
pub const ACTION_TENSOR: &str = "sluicegate_action";

/// Whether a request or response with this `content-type` is gRPC (`application/grpc`,
/// `application/grpc+proto`, …; not `application/grpc-web`).
pub fn is_grpc(content_type: Option<&http::HeaderValue>) -> bool {
    content_type.is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && (v.len() == 16 || v[16] == b'+' || v[16] == b';')
    })
}

/// A `ModelInfer` request.
#[derive(Clone, PartialEq, Message)]
pub struct ModelInferRequest {
    #[prost(string, tag = "1")]
    pub model_name: String,
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: HashMap<String, InferParameter>,
    #[prost(message, repeated, tag = "5")]
    pub inputs: Vec<InferInputTensor>,
    #[prost(message, repeated, tag = "6")]
    pub outputs: Vec<InferRequestedOutputTensor>,
    #[prost(bytes = "vec", repeated, tag = "7")]
    pub raw_input_contents: Vec<Vec<u8>>,
}

/// An input tensor of a request.
#[derive(Clone, PartialEq, Message)]
pub struct InferInputTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub datatype: String,
    #[prost(int64, repeated, tag = "3")]
    pub shape: Vec<i64>,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: HashMap<String, InferParameter>,
    #[prost(message, optional, tag = "5")]
    pub contents: Option<InferTensorContents>,
}

/// An output a request asks for.
#[derive(Clone, PartialEq, Message)]
pub struct InferRequestedOutputTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(map = "string, message", tag = "2")]
    pub parameters: HashMap<String, InferParameter>,
}

/// A `ModelInfer` response.
#[derive(Clone, PartialEq, Message)]
pub struct ModelInferResponse {
    #[prost(string, tag = "1")]
    pub model_name: String,
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: HashMap<String, InferParameter>,
    #[prost(message, repeated, tag = "5")]
    pub outputs: Vec<InferOutputTensor>,
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub raw_output_contents: Vec<Vec<u8>>,
}

/// An output tensor of a response.
#[derive(Clone, PartialEq, Message)]
pub struct InferOutputTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub datatype: String,
    #[prost(int64, repeated, tag = "3")]
    pub shape: Vec<i64>,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: HashMap<String, InferParameter>,
    #[prost(message, optional, tag = "5")]
    pub contents: Option<InferTensorContents>,
}

/// A parameter value (Triton adds `double_param` and `uint64_param` to KServe's three).
#[derive(Clone, PartialEq, Message)]
pub struct InferParameter {
    #[prost(oneof = "ParameterChoice", tags = "1, 2, 3, 4, 5")]
    pub parameter_choice: Option<ParameterChoice>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ParameterChoice {
    #[prost(bool, tag = "1")]
    BoolParam(bool),
    #[prost(int64, tag = "2")]
    Int64Param(i64),
    #[prost(string, tag = "3")]
    StringParam(String),
    #[prost(double, tag = "4")]
    DoubleParam(f64),
    #[prost(uint64, tag = "5")]
    Uint64Param(u64),
}

/// A tensor's contents in typed form (the alternative is the message's raw contents).
#[derive(Clone, PartialEq, Message)]
pub struct InferTensorContents {
    #[prost(bool, repeated, tag = "1")]
    pub bool_contents: Vec<bool>,
    #[prost(int32, repeated, tag = "2")]
    pub int_contents: Vec<i32>,
    #[prost(int64, repeated, tag = "3")]
    pub int64_contents: Vec<i64>,
    #[prost(uint32, repeated, tag = "4")]
    pub uint_contents: Vec<u32>,
    #[prost(uint64, repeated, tag = "5")]
    pub uint64_contents: Vec<u64>,
    #[prost(float, repeated, tag = "6")]
    pub fp32_contents: Vec<f32>,
    #[prost(double, repeated, tag = "7")]
    pub fp64_contents: Vec<f64>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub bytes_contents: Vec<Vec<u8>>,
}

/// Why a gRPC body is not one message sluicegate can read.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("the gRPC body holds no message")]
    Empty,
    #[error("the gRPC body is cut short: a message of {declared} bytes, {present} present")]
    Short { declared: usize, present: usize },
    #[error("the gRPC body holds more than one message")]
    Several,
}

/// The one message of a unary call's body: whether it is compressed, and its bytes.
pub fn one_message(body: &Bytes) -> Result<(bool, Bytes), FrameError> {
    let (compressed, message) = split_message(body)?;
    Ok((compressed, body.slice_ref(message)))
}

/// [`one_message`] on a borrowed body.
pub fn split_message(body: &[u8]) -> Result<(bool, &[u8]), FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    if body.len() < 5 {
        return Err(FrameError::Short {
            declared: 5,
            present: body.len(),
        });
    }
    let compressed = body[0] & 1 == 1;
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let present = body.len() - 5;
    match present.cmp(&len) {
        std::cmp::Ordering::Less => Err(FrameError::Short {
            declared: len,
            present,
        }),
        std::cmp::Ordering::Greater => Err(FrameError::Several),
        std::cmp::Ordering::Equal => Ok((compressed, &body[5..])),
    }
}

/// A compressed message decompressed (`grpc-encoding` gzip or deflate), at most `limit` bytes.
pub fn decompress(encoding: &str, message: &[u8], limit: u64) -> Result<Vec<u8>, DecompressError> {
    use std::io::Read;
    let mut out = Vec::new();
    let read = match encoding {
        "gzip" => flate2::read::GzDecoder::new(message)
            .take(limit.saturating_add(1))
            .read_to_end(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(message)
            .take(limit.saturating_add(1))
            .read_to_end(&mut out),
        other => return Err(DecompressError::Unsupported(other.to_owned())),
    };
    match read {
        Err(e) => Err(DecompressError::Broken(encoding.to_owned(), e)),
        Ok(_) if out.len() as u64 > limit => Err(DecompressError::TooLarge(limit)),
        Ok(_) => Ok(out),
    }
}

/// Why a compressed message was not decompressed.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    #[error("grpc-encoding {0:?} is not one sluicegate decodes (gzip, deflate)")]
    Unsupported(String),
    #[error("the {0} message does not decode: {1}")]
    Broken(String, std::io::Error),
    #[error("message larger than {0} bytes once decoded")]
    TooLarge(u64),
}

/// A tensor's values, typed by its `datatype`, from typed contents or raw bytes.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// FP32, and FP16 and BF16 widened to it (exactly).
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    U64(Vec<u64>),
    Bool(Vec<bool>),
    /// BYTES, each element as sent.
    Bytes(Vec<Vec<u8>>),
}

impl Data {
    /// Each value as a number, `None` where it is none (BOOL, BYTES) or not finite.
    pub fn numbers(&self) -> Vec<Option<f64>> {
        let finite = |x: f64| x.is_finite().then_some(x);
        match self {
            Data::F32(v) => v.iter().map(|&x| finite(f64::from(x))).collect(),
            Data::F64(v) => v.iter().map(|&x| finite(x)).collect(),
            Data::I64(v) => v.iter().map(|&x| Some(x as f64)).collect(),
            Data::U64(v) => v.iter().map(|&x| Some(x as f64)).collect(),
            Data::Bool(v) => vec![None; v.len()],
            Data::Bytes(v) => vec![None; v.len()],
        }
    }
}

/// Why a tensor's values could not be read.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum DataError {
    #[error("datatype {0:?} is not one the protocol defines")]
    UnknownDatatype(String),
    #[error("{len} raw bytes are not a whole number of {width}-byte values")]
    RaggedRaw { len: usize, width: usize },
    #[error("raw BYTES contents end inside an element")]
    CutBytes,
}

/// The values of typed `contents`, from the list `datatype` names.
pub fn typed_data(datatype: &str, c: &InferTensorContents) -> Result<Data, DataError> {
    Ok(match datatype {
        "FP32" => Data::F32(c.fp32_contents.clone()),
        "FP64" => Data::F64(c.fp64_contents.clone()),
        "INT8" | "INT16" | "INT32" => {
            Data::I64(c.int_contents.iter().map(|&x| i64::from(x)).collect())
        }
        "INT64" => Data::I64(c.int64_contents.clone()),
        "UINT8" | "UINT16" | "UINT32" => {
            Data::U64(c.uint_contents.iter().map(|&x| u64::from(x)).collect())
        }
        "UINT64" => Data::U64(c.uint64_contents.clone()),
        "BOOL" => Data::Bool(c.bool_contents.clone()),
        "BYTES" => Data::Bytes(c.bytes_contents.clone()),
        other => return Err(DataError::UnknownDatatype(other.to_owned())),
    })
}

/// The values of raw contents: little-endian, `datatype`'s width each; BYTES elements each a
/// 4-byte little-endian length, then the bytes.
pub fn raw_data(datatype: &str, raw: &[u8]) -> Result<Data, DataError> {
    fn each<const N: usize, T>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Result<Vec<T>, DataError> {
        if !raw.len().is_multiple_of(N) {
            return Err(DataError::RaggedRaw {
                len: raw.len(),
                width: N,
            });
        }
        Ok(raw
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks of N")))
            .collect())
    }
    Ok(match datatype {
        "FP32" => Data::F32(each(raw, f32::from_le_bytes)?),
        "FP64" => Data::F64(each(raw, f64::from_le_bytes)?),
        "FP16" => Data::F32(each(raw, |b| f16_to_f32(u16::from_le_bytes(b)))?),
        "BF16" => Data::F32(each(raw, |b: [u8; 2]| {
            f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)
        })?),
        "INT8" => Data::I64(each(raw, |b| i64::from(i8::from_le_bytes(b)))?),
        "INT16" => Data::I64(each(raw, |b| i64::from(i16::from_le_bytes(b)))?),
        "INT32" => Data::I64(each(raw, |b| i64::from(i32::from_le_bytes(b)))?),
        "INT64" => Data::I64(each(raw, i64::from_le_bytes)?),
        "UINT8" => Data::U64(each(raw, |b| u64::from(u8::from_le_bytes(b)))?),
        "UINT16" => Data::U64(each(raw, |b| u64::from(u16::from_le_bytes(b)))?),
        "UINT32" => Data::U64(each(raw, |b| u64::from(u32::from_le_bytes(b)))?),
        "UINT64" => Data::U64(each(raw, u64::from_le_bytes)?),
        "BOOL" => Data::Bool(each(raw, |b: [u8; 1]| b[0] != 0)?),
        "BYTES" => {
            let mut values = Vec::new();
            let mut rest = raw;
            while !rest.is_empty() {
                let (len, tail) = rest.split_first_chunk::<4>().ok_or(DataError::CutBytes)?;
                let len = u32::from_le_bytes(*len) as usize;
                if tail.len() < len {
                    return Err(DataError::CutBytes);
                }
                values.push(tail[..len].to_vec());
                rest = &tail[len..];
            }
            Data::Bytes(values)
        }
        other => return Err(DataError::UnknownDatatype(other.to_owned())),
    })
}

/// Which message of a `ModelInfer` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

/// A `ModelInfer` message as the REST v2 body of the same call, for the record.
#[derive(Debug)]
pub struct AsJson {
    /// The JSON text: tensors as arrays, raw contents decoded by datatype, BYTES as base64.
    pub json: String,
    /// The message's `id`, `model_name` and `model_version`, where it states them.
    pub id: Option<String>,
    pub model_name: Option<String>,
    pub model_version: Option<String>,
}

/// The most a compressed message is decompressed to for the record.
const MAX_RECORDED_MESSAGE: u64 = 64 << 20;

/// A captured `ModelInfer` body (one gRPC message, compressed per `grpc_encoding` or not) as
/// JSON in the REST v2 shape; `None` when it is not one readable message of that kind.
pub fn as_v2_json(side: Side, grpc_encoding: Option<&str>, body: &[u8]) -> Option<AsJson> {
    let message = message_bytes(grpc_encoding, body)?;
    let named = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let json = match side {
        Side::Request => {
            let r = ModelInferRequest::decode(&message[..]).ok()?;
            let inputs = r
                .inputs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    json_tensor(
                        (&t.name, &t.datatype, &t.shape, &t.parameters),
                        t.contents.as_ref(),
                        r.raw_input_contents.get(i),
                    )
                })
                .collect::<Option<Vec<_>>>()?;
            let outputs: Vec<_> = r
                .outputs
                .iter()
                .map(|o| RequestedOutput {
                    name: &o.name,
                    parameters: Params(&o.parameters),
                })
                .collect();
            let body = RequestJson {
                id: named(&r.id),
                parameters: Params(&r.parameters),
                inputs,
                outputs,
            };
            AsJson {
                json: serde_json::to_string(&body).ok()?,
                id: named(&r.id),
                model_name: named(&r.model_name),
                model_version: named(&r.model_version),
            }
        }
        Side::Response => {
            let r = ModelInferResponse::decode(&message[..]).ok()?;
            let outputs = r
                .outputs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    json_tensor(
                        (&t.name, &t.datatype, &t.shape, &t.parameters),
                        t.contents.as_ref(),
                        r.raw_output_contents.get(i),
                    )
                })
                .collect::<Option<Vec<_>>>()?;
            let body = ResponseJson {
                model_name: &r.model_name,
                model_version: named(&r.model_version),
                id: named(&r.id),
                parameters: Params(&r.parameters),
                outputs,
            };
            AsJson {
                json: serde_json::to_string(&body).ok()?,
                id: named(&r.id),
                model_name: named(&r.model_name),
                model_version: named(&r.model_version),
            }
        }
    };
    Some(json)
}

/// A tensor as JSON: its head, and its values from its raw entry if the message has raw
/// contents, else from its typed contents; `None` when they do not read.
fn json_tensor<'a>(
    (name, datatype, shape, parameters): (
        &'a str,
        &'a str,
        &'a [i64],
        &'a HashMap<String, InferParameter>,
    ),
    contents: Option<&InferTensorContents>,
    raw: Option<&Vec<u8>>,
) -> Option<JsonTensor<'a>> {
    let data = match raw {
        Some(raw) => raw_data(datatype, raw),
        None => typed_data(datatype, contents.unwrap_or(&Default::default())),
    };
    Some(JsonTensor {
        name,
        shape,
        datatype,
        parameters: Params(parameters),
        data: data.ok()?,
    })
}

/// The strings a `ModelInfer` request carries — BYTES input elements and string parameters —
/// where a provenance tag that came back as input would be.
pub fn request_strings(grpc_encoding: Option<&str>, body: &[u8]) -> Vec<Vec<u8>> {
    let Some(message) = message_bytes(grpc_encoding, body) else {
        return Vec::new();
    };
    let Ok(r) = ModelInferRequest::decode(&message[..]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let strings = |params: &HashMap<String, InferParameter>, out: &mut Vec<Vec<u8>>| {
        for p in params.values() {
            if let Some(ParameterChoice::StringParam(s)) = &p.parameter_choice {
                out.push(s.clone().into_bytes());
            }
        }
    };
    strings(&r.parameters, &mut out);
    for (i, t) in r.inputs.iter().enumerate() {
        strings(&t.parameters, &mut out);
        if t.datatype != "BYTES" {
            continue;
        }
        let data = match r.raw_input_contents.get(i) {
            Some(raw) => raw_data("BYTES", raw),
            None => typed_data("BYTES", t.contents.as_ref().unwrap_or(&Default::default())),
        };
        if let Ok(Data::Bytes(elements)) = data {
            out.extend(elements);
        }
    }
    out
}

/// The message of a body that is one gRPC message, decompressed if it is compressed.
fn message_bytes<'a>(
    grpc_encoding: Option<&str>,
    body: &'a [u8],
) -> Option<std::borrow::Cow<'a, [u8]>> {
    let (compressed, message) = split_message(body).ok()?;
    if !compressed {
        return Some(std::borrow::Cow::Borrowed(message));
    }
    decompress(grpc_encoding?, message, MAX_RECORDED_MESSAGE)
        .ok()
        .map(std::borrow::Cow::Owned)
}

#[derive(serde::Serialize)]
struct RequestJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Params::is_empty")]
    parameters: Params<'a>,
    inputs: Vec<JsonTensor<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    outputs: Vec<RequestedOutput<'a>>,
}

#[derive(serde::Serialize)]
struct RequestedOutput<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Params::is_empty")]
    parameters: Params<'a>,
}

#[derive(serde::Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Params::is_empty")]
    parameters: Params<'a>,
    outputs: Vec<JsonTensor<'a>>,
}

#[derive(serde::Serialize)]
struct JsonTensor<'a> {
    name: &'a str,
    shape: &'a [i64],
    datatype: &'a str,
    #[serde(skip_serializing_if = "Params::is_empty")]
    parameters: Params<'a>,
    data: Data,
}

/// Parameters as a JSON object of plain values.
struct Params<'a>(&'a HashMap<String, InferParameter>);

impl Params<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl serde::Serialize for Params<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        // Sorted: the record is the same for the same message.
        let mut keys: Vec<&String> = self.0.keys().collect();
        keys.sort();
        let mut m = s.serialize_map(Some(keys.len()))?;
        for k in keys {
            match &self.0[k].parameter_choice {
                Some(ParameterChoice::BoolParam(v)) => m.serialize_entry(k, v)?,
                Some(ParameterChoice::Int64Param(v)) => m.serialize_entry(k, v)?,
                Some(ParameterChoice::StringParam(v)) => m.serialize_entry(k, v)?,
                Some(ParameterChoice::DoubleParam(v)) => m.serialize_entry(k, v)?,
                Some(ParameterChoice::Uint64Param(v)) => m.serialize_entry(k, v)?,
                None => m.serialize_entry(k, &())?,
            }
        }
        m.end()
    }
}

/// Values as REST writes them: numbers (FP32 as its shortest round-trip decimal, a value that
/// is not finite as `null`), booleans, and BYTES as base64 strings.
impl serde::Serialize for Data {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        match self {
            Data::F32(v) => v.serialize(s),
            Data::F64(v) => v.serialize(s),
            Data::I64(v) => v.serialize(s),
            Data::U64(v) => v.serialize(s),
            Data::Bool(v) => v.serialize(s),
            Data::Bytes(v) => s.collect_seq(
                v.iter()
                    .map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
            ),
        }
    }
}

/// IEEE 754 half precision to f32 (exact: every half is an f32).
fn f16_to_f32(bits: u16) -> f32 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let frac = f32::from(bits & 0x3ff);
    sign * match exp {
        0 => frac * 2f32.powi(-24),
        31 if frac == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    }
}

/// `message` framed as one uncompressed gRPC message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// `message` (a `ModelInferResponse` as the server encoded it) with the `sluicegate_action`
/// tensor appended, framed as one uncompressed gRPC message, in one buffer: protobuf merges a
/// repeated field's elements across the message, so the tensor becomes the last output without
/// the rest being decoded and re-encoded. In raw form (`raw` true: the response carries
/// `raw_output_contents`, and the protocol forbids mixing the two) its contents go as one more
/// raw entry — each action a 4-byte little-endian length, then its bytes — matching the new
/// output's position.
pub fn frame_with_action_tensor(message: &[u8], actions: &[&str], raw: bool) -> Bytes {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    let tensor = InferOutputTensor {
        name: ACTION_TENSOR.to_owned(),
        datatype: "BYTES".to_owned(),
        shape: vec![actions.len() as i64],
        ..Default::default()
    };
    // Each action as a length-delimited entry: of `bytes_contents` (field 8 of the contents)
    // in typed form, of the one raw entry in raw form.
    let entry_len = |a: &&str| match raw {
        true => 4 + a.len(),
        false => 1 + encoded_len_varint(a.len() as u64) + a.len(),
    };
    let contents_len: usize = actions.iter().map(entry_len).sum();
    let tensor_len = tensor.encoded_len()
        + if raw {
            0
        } else {
            // `contents` (field 5 of the tensor) holding the entries.
            1 + encoded_len_varint(contents_len as u64) + contents_len
        };
    let mut out = BytesMut::with_capacity(5 + message.len() + tensor_len + contents_len + 20);
    out.put_u8(0);
    out.put_u32(0); // the length, set below
    out.put_slice(message);
    encode_key(5, WireType::LengthDelimited, &mut out);
    encode_varint(tensor_len as u64, &mut out);
    tensor.encode_raw(&mut out);
    if raw {
        encode_key(6, WireType::LengthDelimited, &mut out);
        encode_varint(contents_len as u64, &mut out);
        for a in actions {
            out.put_u32_le(a.len() as u32);
            out.put_slice(a.as_bytes());
        }
    } else {
        encode_key(5, WireType::LengthDelimited, &mut out);
        encode_varint(contents_len as u64, &mut out);
        for a in actions {
            encode_key(8, WireType::LengthDelimited, &mut out);
            encode_varint(a.len() as u64, &mut out);
            out.put_slice(a.as_bytes());
        }
    }
    let len = (out.len() - 5) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

/// Decodes a `ModelInferResponse`.
pub fn decode_response(message: &[u8]) -> Result<ModelInferResponse, prost::DecodeError> {
    ModelInferResponse::decode(message)
}

/// Finds a `ModelInfer` request's `model_name` as its body streams past, chunk by chunk, without
/// keeping the body: it walks the first message's top-level fields and keeps the last
/// `model_name` (protobuf's rule for a repeated scalar field: the last one wins, so a decoy
/// name placed first cannot pick the route). A compressed message is not read: its name comes
/// from the response instead.
#[derive(Debug, Default)]
pub struct ModelNameScanner {
    state: ScanState,
    /// Bytes of the message still to come.
    left: usize,
    name: Vec<u8>,
    found: Option<String>,
}

#[derive(Debug, Default)]
enum ScanState {
    /// Reading the 5-byte message prefix; `have` bytes of it so far.
    #[default]
    Prefix,
    PrefixPart {
        buf: [u8; 5],
        have: usize,
    },
    /// A field's tag (a varint), as far as it has come.
    Tag {
        value: u64,
        shift: u32,
    },
    /// Skipping a varint field's value.
    SkipVarint,
    /// A length-delimited field's length; `field` is its number.
    Length {
        field: u64,
        value: u64,
        shift: u32,
    },
    /// Skipping this many bytes.
    Skip(usize),
    /// Collecting a `model_name` of this many bytes more.
    Name(usize),
    /// The first message has been walked whole.
    Done,
    /// Not readable here (compressed, a group, a malformed varint).
    GaveUp,
}

/// The longest `model_name` kept; a longer one names no route.
const MAX_NAME: usize = 1024;

impl ModelNameScanner {
    /// The last `model_name` of the first message, once it has been walked whole.
    pub fn model_name(&self) -> Option<&str> {
        match self.state {
            ScanState::Done => self.found.as_deref(),
            _ => None,
        }
    }

    /// Whether it has read all it will: the first message walked whole, or given up on.
    pub fn finished(&self) -> bool {
        matches!(self.state, ScanState::Done | ScanState::GaveUp)
    }

    /// Reads the next piece of the request body.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let inside_a_field = matches!(
                self.state,
                ScanState::Tag { .. }
                    | ScanState::SkipVarint
                    | ScanState::Length { .. }
                    | ScanState::Skip(_)
                    | ScanState::Name(_)
            );
            if inside_a_field && self.left == 0 {
                // A field runs past the end of its message.
                self.state = ScanState::GaveUp;
                return;
            }
            match &mut self.state {
                ScanState::Done | ScanState::GaveUp => return,
                ScanState::Prefix => {
                    self.state = ScanState::PrefixPart {
                        buf: [0; 5],
                        have: 0,
                    }
                }
                ScanState::PrefixPart { buf, have } => {
                    let take = (5 - *have).min(chunk.len());
                    buf[*have..*have + take].copy_from_slice(&chunk[..take]);
                    *have += take;
                    chunk = &chunk[take..];
                    if *have == 5 {
                        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                        self.left = len;
                        self.state = if buf[0] & 1 == 1 {
                            ScanState::GaveUp
                        } else {
                            ScanState::Tag { value: 0, shift: 0 }
                        };
                        self.end_if_walked();
                    }
                }
                ScanState::Tag { value, shift } => {
                    let Some(done) = varint_step(value, shift, chunk[0]) else {
                        self.state = ScanState::GaveUp;
                        return;
                    };
                    chunk = &chunk[1..];
                    self.left = self.left.saturating_sub(1);
                    if done {
                        let (field, wire) = (*value >> 3, *value & 7);
                        self.state = match wire {
                            0 => ScanState::SkipVarint,
                            1 => ScanState::Skip(8),
                            2 => ScanState::Length {
                                field,
                                value: 0,
                                shift: 0,
                            },
                            5 => ScanState::Skip(4),
                            _ => ScanState::GaveUp,
                        };
                    }
                }
                ScanState::SkipVarint => {
                    let more = chunk[0] & 0x80 != 0;
                    chunk = &chunk[1..];
                    self.left = self.left.saturating_sub(1);
                    if !more {
                        self.next_field();
                    }
                }
                ScanState::Length {
                    field,
                    value,
                    shift,
                } => {
                    let Some(done) = varint_step(value, shift, chunk[0]) else {
                        self.state = ScanState::GaveUp;
                        return;
                    };
                    chunk = &chunk[1..];
                    self.left = self.left.saturating_sub(1);
                    if done {
                        let len = *value as usize;
                        self.state = if *field == 1 && len <= MAX_NAME {
                            self.name.clear();
                            ScanState::Name(len)
                        } else {
                            if *field == 1 {
                                // Too long to be a name a route could have.
                                self.found = None;
                            }
                            ScanState::Skip(len)
                        };
                        self.after_length();
                    }
                }
                ScanState::Skip(n) => {
                    let take = (*n).min(chunk.len()).min(self.left);
                    *n -= take;
                    chunk = &chunk[take..];
                    self.left -= take;
                    if *n == 0 {
                        self.next_field();
                    } else if self.left == 0 {
                        self.state = ScanState::GaveUp;
                    }
                }
                ScanState::Name(n) => {
                    let take = (*n).min(chunk.len()).min(self.left);
                    self.name.extend_from_slice(&chunk[..take]);
                    *n -= take;
                    chunk = &chunk[take..];
                    self.left -= take;
                    if *n == 0 {
                        self.found = String::from_utf8(std::mem::take(&mut self.name)).ok();
                        self.next_field();
                    } else if self.left == 0 {
                        self.state = ScanState::GaveUp;
                    }
                }
            }
        }
    }

    /// A field ended: the next tag, or the end of the message.
    fn next_field(&mut self) {
        self.state = ScanState::Tag { value: 0, shift: 0 };
        self.end_if_walked();
    }

    /// A zero-length field ends at once.
    fn after_length(&mut self) {
        match self.state {
            ScanState::Name(0) => {
                self.found = Some(String::new());
                self.next_field();
            }
            ScanState::Skip(0) => self.next_field(),
            _ => {}
        }
    }

    /// The message is walked whole when no byte of it is left between two fields.
    fn end_if_walked(&mut self) {
        if self.left == 0 && matches!(self.state, ScanState::Tag { value: 0, shift: 0 }) {
            self.state = ScanState::Done;
        }
    }
}

/// One byte of a varint into `value`: `Some(true)` when it was the last, `None` past 10 bytes.
fn varint_step(value: &mut u64, shift: &mut u32, byte: u8) -> Option<bool> {
    if *shift >= 64 {
        return None;
    }
    *value |= u64::from(byte & 0x7f) << *shift;
    *shift += 7;
    Some(byte & 0x80 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str) -> ModelInferRequest {
        ModelInferRequest {
            model_name: name.into(),
            model_version: "3".into(),
            id: "r-1".into(),
            inputs: vec![InferInputTensor {
                name: "text".into(),
                datatype: "BYTES".into(),
                shape: vec![2],
                contents: Some(InferTensorContents {
                    bytes_contents: vec![b"hello".to_vec(), b"win a prize".to_vec()],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn scan_in_pieces(body: &[u8], piece: usize) -> Option<String> {
        let mut s = ModelNameScanner::default();
        for c in body.chunks(piece) {
            s.feed(c);
        }
        s.model_name().map(str::to_owned)
    }

    #[test]
    fn the_model_name_is_found_whatever_the_chunking() {
        let body = frame(&request("spam-filter").encode_to_vec());
        for piece in 1..=body.len() {
            assert_eq!(
                scan_in_pieces(&body, piece).as_deref(),
                Some("spam-filter"),
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn the_last_model_name_wins_as_protobuf_decodes_it() {
        // A decoy first, the real name last: the server runs the last one.
        let mut message = request("decoy").encode_to_vec();
        prost::encoding::string::encode(1, &"spam-filter".to_owned(), &mut message);
        assert_eq!(
            ModelInferRequest::decode(&message[..]).unwrap().model_name,
            "spam-filter"
        );
        let body = frame(&message);
        for piece in [1, 3, 7, body.len()] {
            assert_eq!(scan_in_pieces(&body, piece).as_deref(), Some("spam-filter"));
        }
    }

    #[test]
    fn unreadable_requests_name_no_model() {
        let message = request("m").encode_to_vec();
        let mut compressed = frame(&message).to_vec();
        compressed[0] = 1;
        assert_eq!(scan_in_pieces(&compressed, 4), None, "compressed");
        let whole = frame(&message);
        assert_eq!(
            scan_in_pieces(&whole[..whole.len() - 1], 4),
            None,
            "not walked whole yet"
        );
        assert_eq!(scan_in_pieces(&frame(&[0x0b, 0x01]), 1), None, "a group");
        assert_eq!(scan_in_pieces(&frame(&[]), 1), None, "no name at all");
        let mut long = Vec::new();
        prost::encoding::string::encode(1, &"x".repeat(MAX_NAME + 1), &mut long);
        assert_eq!(scan_in_pieces(&frame(&long), 100), None, "too long a name");
    }

    #[test]
    fn one_message_frames_and_unframes() {
        let body = frame(b"abc");
        assert_eq!(one_message(&body), Ok((false, Bytes::from_static(b"abc"))));
        assert_eq!(one_message(&Bytes::new()), Err(FrameError::Empty));
        assert!(matches!(
            one_message(&body.slice(..6)),
            Err(FrameError::Short { .. })
        ));
        let mut two = body.to_vec();
        two.extend_from_slice(&body);
        assert_eq!(one_message(&Bytes::from(two)), Err(FrameError::Several));
    }

    #[test]
    fn the_action_tensor_is_appended_in_the_form_the_response_uses() {
        let typed = ModelInferResponse {
            model_name: "m".into(),
            outputs: vec![InferOutputTensor {
                name: "predict_proba".into(),
                datatype: "FP32".into(),
                shape: vec![2],
                contents: Some(InferTensorContents {
                    fp32_contents: vec![0.1, 0.9],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let out =
            frame_with_action_tensor(&typed.encode_to_vec(), &["deliver", "quarantine"], false);
        let back = ModelInferResponse::decode(split_message(&out).unwrap().1).unwrap();
        assert_eq!(back.outputs.len(), 2);
        assert_eq!(
            back.outputs[0], typed.outputs[0],
            "the model's output untouched"
        );
        let t = &back.outputs[1];
        assert_eq!(
            (t.name.as_str(), t.datatype.as_str(), &t.shape[..]),
            (ACTION_TENSOR, "BYTES", &[2i64][..])
        );
        assert_eq!(
            t.contents.as_ref().unwrap().bytes_contents,
            vec![b"deliver".to_vec(), b"quarantine".to_vec()]
        );

        let raw = ModelInferResponse {
            outputs: vec![InferOutputTensor {
                contents: None,
                ..typed.outputs[0].clone()
            }],
            raw_output_contents: vec![[0.1f32.to_le_bytes(), 0.9f32.to_le_bytes()].concat()],
            ..typed
        };
        let out = frame_with_action_tensor(&raw.encode_to_vec(), &["deliver", "quarantine"], true);
        let back = ModelInferResponse::decode(split_message(&out).unwrap().1).unwrap();
        assert_eq!(back.outputs.len(), 2);
        assert_eq!(
            back.raw_output_contents.len(),
            2,
            "one raw entry per output"
        );
        assert!(back.outputs[1].contents.is_none(), "never both forms");
        let mut expected = Vec::new();
        for a in ["deliver", "quarantine"] {
            expected.extend_from_slice(&(a.len() as u32).to_le_bytes());
            expected.extend_from_slice(a.as_bytes());
        }
        assert_eq!(back.raw_output_contents[1], expected);
    }

    #[test]
    fn raw_contents_decode_by_datatype() {
        assert_eq!(raw_data("FP16", &[0x00, 0x38]), Ok(Data::F32(vec![0.5])));
        assert_eq!(
            raw_data("FP16", &[0x00, 0x7c]).unwrap().numbers(),
            vec![None],
            "inf is no score"
        );
        assert_eq!(raw_data("BF16", &[0x00, 0x3f]), Ok(Data::F32(vec![0.5])));
        assert_eq!(
            raw_data("INT64", &(-3i64).to_le_bytes()),
            Ok(Data::I64(vec![-3]))
        );
        assert_eq!(raw_data("UINT8", &[7, 9]), Ok(Data::U64(vec![7, 9])));
        let bytes = [&2u32.to_le_bytes()[..], b"ab", &0u32.to_le_bytes()[..]].concat();
        assert_eq!(
            raw_data("BYTES", &bytes),
            Ok(Data::Bytes(vec![b"ab".to_vec(), vec![]]))
        );
        assert_eq!(raw_data("BYTES", &bytes[..5]), Err(DataError::CutBytes));
        assert!(matches!(
            raw_data("FP64", &[0; 9]),
            Err(DataError::RaggedRaw { .. })
        ));
        assert!(matches!(
            raw_data("COMPLEX", &[0; 8]),
            Err(DataError::UnknownDatatype(_))
        ));
    }

    #[test]
    fn grpc_content_types() {
        let ct = |s: &'static str| Some(http::HeaderValue::from_static(s));
        assert!(is_grpc(ct("application/grpc").as_ref()));
        assert!(is_grpc(ct("application/grpc+proto").as_ref()));
        assert!(is_grpc(ct("Application/GRPC").as_ref()));
        assert!(!is_grpc(ct("application/grpc-web").as_ref()));
        assert!(!is_grpc(ct("application/json").as_ref()));
        assert!(!is_grpc(None));
    }
}
