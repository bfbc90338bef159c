//! The Open Inference Protocol's gRPC API (`inference.GRPCInferenceService`) as far as
//! sluicegate reads it: the `ModelInfer` messages, gRPC's length-prefixed message framing, and
//! a scanner that finds a request's `model_name` while the request streams through.
//!
//! The message types are written out with `prost`'s derive, field for field as the protocol
//! publishes them (`grpc_predict_v2.proto`: KServe, Triton and MLServer share it), so the build
//! needs no `protoc`. Only what sluicegate decodes is declared; a decided response is never
//! re-encoded from these types (which would drop fields they do not declare): sluicegate
//! appends its output to the message as sent (see [`append_action_tensor`]).

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
        std::cmp::Ordering::Equal => Ok((compressed, body.slice(5..))),
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
/// tensor appended: protobuf merges a repeated field's elements across the message, so the
/// tensor becomes the last output without the rest being decoded and re-encoded. In raw form
/// (`raw` true: the response carries `raw_output_contents`, and the protocol forbids mixing
/// the two) its contents go as one more raw entry — each action a 4-byte little-endian length,
/// then its bytes — matching the new output's position.
pub fn append_action_tensor(message: &[u8], actions: &[&str], raw: bool) -> Vec<u8> {
    let mut tensor = InferOutputTensor {
        name: ACTION_TENSOR.to_owned(),
        datatype: "BYTES".to_owned(),
        shape: vec![actions.len() as i64],
        ..Default::default()
    };
    let mut out = message.to_vec();
    if raw {
        let mut contents = Vec::with_capacity(actions.iter().map(|a| a.len() + 4).sum());
        for a in actions {
            contents.extend_from_slice(&(a.len() as u32).to_le_bytes());
            contents.extend_from_slice(a.as_bytes());
        }
        prost::encoding::message::encode(5, &tensor, &mut out);
        prost::encoding::bytes::encode(6, &contents, &mut out);
    } else {
        tensor.contents = Some(InferTensorContents {
            bytes_contents: actions.iter().map(|a| a.as_bytes().to_vec()).collect(),
            ..Default::default()
        });
        prost::encoding::message::encode(5, &tensor, &mut out);
    }
    out
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
        let out = append_action_tensor(&typed.encode_to_vec(), &["deliver", "quarantine"], false);
        let back = ModelInferResponse::decode(&out[..]).unwrap();
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
        let out = append_action_tensor(&raw.encode_to_vec(), &["deliver", "quarantine"], true);
        let back = ModelInferResponse::decode(&out[..]).unwrap();
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
