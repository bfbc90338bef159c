//! Stand-ins that several modules test against (and `demo` runs): a model server speaking
//! the Open Inference Protocol v2 and TF-Serving v1, and the request bodies it scores. It sits
//! below every other module, so a module's tests can use it without an upward edge.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
/// The stand-in model: a logistic regression over four features, served over the Open
/// Inference Protocol v2 (`/v2/models/NAME/infer`) and TF-Serving v1 (`/v1/models/NAME:predict`).
pub struct StandInModel;

/// Weights of the stand-in model (a spam score over four request features).
const WEIGHTS: [f64; 4] = [1.7, -0.9, 2.3, 0.4];
const BIAS: f64 = -1.2;
pub const MODEL_NAME: &str = "spam-filter";
pub const MODEL_VERSION: &str = "3";

impl StandInModel {
    /// P(positive) for one row; rows shorter than four features are zero-padded.
    pub fn score(row: &[f64]) -> f64 {
        let z: f64 = BIAS + row.iter().zip(WEIGHTS).map(|(x, w)| x * w).sum::<f64>();
        1.0 / (1.0 + (-z).exp())
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(Self::handle))
                    .await;
            });
        }
    }

    /// Binds 127.0.0.1:0, serves in the background, returns the address.
    pub async fn spawn() -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(Self::serve(listener));
        Ok(addr)
    }

    async fn handle(
        req: Request<Incoming>,
    ) -> Result<
        Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>>,
        hyper::Error,
    > {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        if crate::oip::is_grpc(req.headers().get(header::CONTENT_TYPE)) {
            return Self::handle_grpc(req).await;
        }
        let body = req.into_body().collect().await?.to_bytes();
        let json_response = |status: StatusCode, v: Value| {
            let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        };
        let resp = match (method, path.as_str()) {
            (Method::GET, "/v2/health/ready" | "/v2/health/live" | "/v2") => {
                json_response(StatusCode::OK, json!({"ready": true}))
            }
            (Method::POST, p) if p.starts_with("/v2/models/") && p.ends_with("/infer") => {
                match serde_json::from_slice::<Value>(&body) {
                    Ok(v) => match Self::infer_v2(&v) {
                        Ok(out) => json_response(StatusCode::OK, out),
                        Err(e) => json_response(StatusCode::BAD_REQUEST, json!({"error": e})),
                    },
                    Err(e) => json_response(
                        StatusCode::BAD_REQUEST,
                        json!({"error": format!("invalid JSON: {e}")}),
                    ),
                }
            }
            (Method::POST, p) if p.starts_with("/v1/models/") && p.ends_with(":predict") => {
                match serde_json::from_slice::<Value>(&body) {
                    Ok(v) => match Self::predict_v1(&v) {
                        Ok(out) => json_response(StatusCode::OK, out),
                        Err(e) => json_response(StatusCode::BAD_REQUEST, json!({"error": e})),
                    },
                    Err(e) => json_response(
                        StatusCode::BAD_REQUEST,
                        json!({"error": format!("invalid JSON: {e}")}),
                    ),
                }
            }
            // A token stream, as an LLM server sends it: server-sent events, one per 20 ms.
            (Method::POST, "/generate_stream") => {
                let n: usize = std::str::from_utf8(&body)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(5)
                    .min(1000);
                let (tx, rx) =
                    tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
                tokio::spawn(async move {
                    for i in 0..n {
                        let event = format!("data: {{\"token\":\"t{i}\"}}\n\n");
                        if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
                let stream = tokio_stream_from(rx);
                let mut r = Response::new(StreamBody::new(stream).boxed());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/event-stream"),
                );
                r
            }
            _ => json_response(StatusCode::NOT_FOUND, json!({"error": "not found"})),
        };
        Ok(resp)
    }

    /// The gRPC `ModelInfer` call (h2c, any port): the same model as REST, input `features`
    /// FP64 `[n, k]` typed or raw, output `predict_proba` FP64 `[n, 2]`. The request parameter
    /// `raw_output` asks for `raw_output_contents` (as Triton answers), `gzip_output` for a
    /// gzip-compressed message; a gzip request (`grpc-encoding: gzip`) is read.
    async fn handle_grpc(
        req: Request<Incoming>,
    ) -> Result<
        Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>>,
        hyper::Error,
    > {
        use crate::oip::{self, ParameterChoice};
        use prost::Message;
        use std::io::Read;
        let gzip_request = req
            .headers()
            .get("grpc-encoding")
            .is_some_and(|v| v == "gzip");
        let path_ok = req.uri().path() == oip::MODEL_INFER_PATH;
        let body = req.into_body().collect().await?.to_bytes();
        // A message and then its status in trailers; an error without a message is
        // Trailers-Only (the status in the headers, no body), as gRPC servers send it.
        let answer = |status: u32, message: Option<Bytes>, compressed: bool| {
            let trailers_only = message.is_none();
            let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = Vec::new();
            if let Some(m) = message {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", status.into());
                frames.push(Ok(Frame::data(m)));
                frames.push(Ok(Frame::trailers(trailers)));
            }
            let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
            let h = r.headers_mut();
            if trailers_only {
                h.insert("grpc-status", status.into());
            }
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/grpc"),
            );
            if compressed {
                h.insert("grpc-encoding", header::HeaderValue::from_static("gzip"));
            }
            Ok(r)
        };
        // UNIMPLEMENTED, INVALID_ARGUMENT.
        if !path_ok {
            return answer(12, None, false);
        }
        let Ok((compressed, message)) = oip::one_message(&body) else {
            return answer(3, None, false);
        };
        let message = if compressed && gzip_request {
            let mut out = Vec::new();
            if flate2::read::GzDecoder::new(&message[..])
                .read_to_end(&mut out)
                .is_err()
            {
                return answer(3, None, false);
            }
            Bytes::from(out)
        } else {
            message
        };
        let Ok(request) = oip::ModelInferRequest::decode(&message[..]) else {
            return answer(3, None, false);
        };
        let flag = |name: &str| {
            matches!(
                request
                    .parameters
                    .get(name)
                    .and_then(|p| p.parameter_choice.as_ref()),
                Some(ParameterChoice::BoolParam(true))
            )
        };
        let Ok(response) = Self::infer_grpc(&request, flag("raw_output")) else {
            return answer(3, None, false);
        };
        let encoded = response.encode_to_vec();
        if flag("gzip_output") {
            use std::io::Write;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&encoded).expect("writing to a Vec");
            let zipped = gz.finish().expect("writing to a Vec");
            let mut framed = oip::frame(&zipped).to_vec();
            framed[0] = 1;
            return answer(0, Some(Bytes::from(framed)), true);
        }
        answer(0, Some(oip::frame(&encoded)), false)
    }

    /// The gRPC `ModelInfer` answer to `request`: [`Self::infer_v2`]'s, as a message;
    /// `raw` answers in `raw_output_contents`.
    pub fn infer_grpc(
        request: &crate::oip::ModelInferRequest,
        raw: bool,
    ) -> Result<crate::oip::ModelInferResponse, String> {
        use crate::oip;
        let (index, input) = request
            .inputs
            .iter()
            .enumerate()
            .find(|(_, i)| i.name == "features")
            .ok_or("no input named features")?;
        let flat: Vec<f64> = match request.raw_input_contents.get(index) {
            Some(raw) => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            None => input
                .contents
                .as_ref()
                .map(|c| c.fp64_contents.clone())
                .unwrap_or_default(),
        };
        let cols = input.shape.get(1).copied().unwrap_or(4).max(1) as usize;
        let rows = flat.len() / cols;
        let proba: Vec<f64> = flat
            .chunks(cols)
            .flat_map(|row| {
                let p = Self::score(row);
                [1.0 - p, p]
            })
            .collect();
        let mut output = oip::InferOutputTensor {
            name: "predict_proba".into(),
            datatype: "FP64".into(),
            shape: vec![rows as i64, 2],
            ..Default::default()
        };
        let mut response = oip::ModelInferResponse {
            model_name: MODEL_NAME.into(),
            model_version: MODEL_VERSION.into(),
            id: request.id.clone(),
            ..Default::default()
        };
        if raw {
            response.raw_output_contents =
                vec![proba.iter().flat_map(|p| p.to_le_bytes()).collect()];
        } else {
            output.contents = Some(oip::InferTensorContents {
                fp64_contents: proba,
                ..Default::default()
            });
        }
        response.outputs.push(output);
        Ok(response)
    }

    /// Open Inference Protocol v2: input `features` (or the first input) of shape `[n, k]`,
    /// output `predict_proba` of shape `[n, 2]`, flat row-major.
    pub fn infer_v2(req: &Value) -> Result<Value, String> {
        let input = req["inputs"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|i| i["name"] == "features")
                    .or_else(|| a.first())
            })
            .ok_or("no inputs")?;
        let shape: Vec<usize> = input["shape"]
            .as_array()
            .ok_or("input has no shape")?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize).ok_or("bad shape"))
            .collect::<Result<_, _>>()?;
        let mut flat = Vec::new();
        flatten(&input["data"], &mut flat)?;
        let (rows, cols) = match shape.as_slice() {
            [n, k] => (*n, *k),
            [k] => (1, *k),
            _ => return Err("shape must be [n, k]".into()),
        };
        if rows * cols != flat.len() || cols == 0 {
            return Err(format!(
                "shape {shape:?} does not match {} values",
                flat.len()
            ));
        }
        let mut proba = Vec::with_capacity(rows * 2);
        for row in flat.chunks(cols) {
            let p = Self::score(row);
            proba.push(1.0 - p);
            proba.push(p);
        }
        let mut out = json!({
            "model_name": MODEL_NAME,
            "model_version": MODEL_VERSION,
            "outputs": [{"name": "predict_proba", "shape": [rows, 2], "datatype": "FP64", "data": proba}],
        });
        if let Some(id) = req.get("id") {
            out["id"] = id.clone();
        }
        Ok(out)
    }

    /// TF-Serving v1: `{"instances": [[f, …], …]}` → `{"predictions": [p, …]}`.
    pub fn predict_v1(req: &Value) -> Result<Value, String> {
        let rows = req["instances"].as_array().ok_or("no instances")?;
        let mut predictions = Vec::with_capacity(rows.len());
        for row in rows {
            let mut flat = Vec::new();
            flatten(row, &mut flat)?;
            predictions.push(Self::score(&flat));
        }
        Ok(json!({ "predictions": predictions }))
    }
}

fn flatten(v: &Value, out: &mut Vec<f64>) -> Result<(), String> {
    match v {
        Value::Array(a) => a.iter().try_for_each(|x| flatten(x, out)),
        Value::Number(n) => {
            out.push(n.as_f64().ok_or("bad number")?);
            Ok(())
        }
        _ => Err("data must be numbers".into()),
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The gRPC `ModelInfer` request of [`v2_request`]'s rows (the same features for the same
/// seed), typed or raw; `flags` are set as bool parameters (`raw_output`, `gzip_output`).
pub fn grpc_request(
    rows: usize,
    seed: u64,
    raw: bool,
    flags: &[&str],
) -> crate::oip::ModelInferRequest {
    use crate::oip::{InferInputTensor, InferParameter, InferTensorContents, ParameterChoice};
    let v: Value = serde_json::from_str(&v2_request(rows, seed)).expect("v2_request is JSON");
    let data: Vec<f64> = v["inputs"][0]["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let mut input = InferInputTensor {
        name: "features".into(),
        datatype: "FP64".into(),
        shape: vec![rows as i64, 4],
        ..Default::default()
    };
    let mut request = crate::oip::ModelInferRequest {
        model_name: MODEL_NAME.into(),
        id: format!("req-{seed}"),
        ..Default::default()
    };
    if raw {
        request.raw_input_contents = vec![data.iter().flat_map(|x| x.to_le_bytes()).collect()];
    } else {
        input.contents = Some(InferTensorContents {
            fp64_contents: data,
            ..Default::default()
        });
    }
    request.inputs.push(input);
    for f in flags {
        request.parameters.insert(
            (*f).to_owned(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::BoolParam(true)),
            },
        );
    }
    request
}

/// A v2 request body with `rows` rows of four pseudo-random features.
pub fn v2_request(rows: usize, seed: u64) -> String {
    v2_request_shifted(rows, seed, 0.0)
}

/// [`v2_request`] with every feature moved by `shift`: inputs that drift, so the model's scores
/// do (a positive shift raises them: the weights sum to 3.5).
pub fn v2_request_shifted(rows: usize, seed: u64, shift: f64) -> String {
    let mut rng = fastrand::Rng::with_seed(seed);
    let data: Vec<f64> = (0..rows * 4)
        .map(|_| rng.f64() * 2.0 - 0.5 + shift)
        .map(|x| (x * 1000.0).round() / 1000.0)
        .collect();
    json!({
        "id": format!("req-{seed}"),
        "inputs": [{"name": "features", "shape": [rows, 4], "datatype": "FP64", "data": data}],
    })
    .to_string()
}
