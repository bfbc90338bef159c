//! Score extraction: where each row's score is in a response, by declared protocol.
//!
//! - v1 (TF-Serving/KServe v1): `predictions[i]` is a number, or an array of class scores
//!   (`column` picks one for a binary route).
//! - v2 (Open Inference Protocol): the output named in the route; `data` is row-major, flat or
//!   nested, so row i, column c of an output of shape `[n, k]` is the flat `data[i*k + c]`.
//! - json: a JSON pointer with one `*` segment standing for the batch's rows.

use serde_json::Value;

use crate::config::policy::{Protocol, ScoreSpec};

/// Each row's scores: one per row (binary) or one per class (multi-class).
#[derive(Clone, Debug, PartialEq)]
pub enum Scores {
    Binary(Vec<f64>),
    Multi(Vec<Vec<f64>>),
}

impl Scores {
    pub fn rows(&self) -> usize {
        match self {
            Scores::Binary(v) => v.len(),
            Scores::Multi(v) => v.len(),
        }
    }
}

/// Why a response could not be read; the response passes through unchanged.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ExtractError {
    #[error("the response is not JSON")]
    NotJson,
    #[error("no {0} in the response")]
    Missing(String),
    #[error("{0}")]
    Shape(String),
    #[error("row {row}: the score is not a finite number")]
    NotANumber { row: usize },
    #[error("the response has no rows")]
    Empty,
}

impl ExtractError {
    /// A bounded metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ExtractError::NotJson => "not_json",
            ExtractError::Missing(_) => "missing",
            ExtractError::Shape(_) => "shape",
            ExtractError::NotANumber { .. } => "not_a_number",
            ExtractError::Empty => "empty",
        }
    }
}

/// Reads the scores. `classes` is the number of classes of a multi-class route, `None` for a
/// binary one.
pub fn extract(
    protocol: Protocol,
    spec: &ScoreSpec,
    classes: Option<usize>,
    body: &Value,
) -> Result<Scores, ExtractError> {
    let scores = match protocol {
        Protocol::V1 => {
            let rows = body
                .get("predictions")
                .and_then(Value::as_array)
                .ok_or_else(|| ExtractError::Missing("predictions array".into()))?;
            rows_of(rows.iter(), spec.column, classes)?
        }
        Protocol::V2 => v2(spec, classes, body)?,
        Protocol::Json => {
            let pointer = spec.pointer.as_deref().unwrap_or("");
            match pointer.split_once("/*") {
                Some((batch, row)) => {
                    let rows = body
                        .pointer(batch)
                        .and_then(Value::as_array)
                        .ok_or_else(|| ExtractError::Missing(format!("array at {batch}")))?;
                    let cells: Vec<&Value> = rows
                        .iter()
                        .map(|r| {
                            if row.is_empty() {
                                Some(r)
                            } else {
                                r.pointer(row)
                            }
                        })
                        .collect::<Option<_>>()
                        .ok_or_else(|| ExtractError::Missing(format!("{row} in every row")))?;
                    rows_of(cells.into_iter(), None, classes)?
                }
                None => {
                    let cell = body
                        .pointer(pointer)
                        .ok_or_else(|| ExtractError::Missing(pointer.to_owned()))?;
                    rows_of(std::iter::once(cell), None, classes)?
                }
            }
        }
    };
    if scores.rows() == 0 {
        return Err(ExtractError::Empty);
    }
    Ok(scores)
}

fn number(v: &Value, row: usize) -> Result<f64, ExtractError> {
    v.as_f64()
        .filter(|f| f.is_finite())
        .ok_or(ExtractError::NotANumber { row })
}

/// One cell per row: a number, or an array of class scores.
fn rows_of<'a>(
    cells: impl Iterator<Item = &'a Value>,
    column: Option<usize>,
    classes: Option<usize>,
) -> Result<Scores, ExtractError> {
    match classes {
        None => {
            let mut out = Vec::new();
            for (row, cell) in cells.enumerate() {
                let v = match (cell, column) {
                    (Value::Array(a), Some(c)) => a.get(c).ok_or_else(|| {
                        ExtractError::Shape(format!(
                            "row {row} has {} columns, no column {c}",
                            a.len()
                        ))
                    })?,
                    (Value::Array(a), None) if a.len() == 1 => &a[0],
                    (Value::Array(a), None) => {
                        return Err(ExtractError::Shape(format!(
                            "row {row} has {} columns; the route names no column",
                            a.len()
                        )))
                    }
                    (v, _) => v,
                };
                out.push(number(v, row)?);
            }
            Ok(Scores::Binary(out))
        }
        Some(k) => {
            let mut out = Vec::new();
            for (row, cell) in cells.enumerate() {
                let a = cell.as_array().ok_or_else(|| {
                    ExtractError::Shape(format!("row {row} is not an array of class scores"))
                })?;
                if a.len() != k {
                    return Err(ExtractError::Shape(format!(
                        "row {row} has {} class scores for {k} classes",
                        a.len()
                    )));
                }
                out.push(a.iter().map(|v| number(v, row)).collect::<Result<_, _>>()?);
            }
            Ok(Scores::Multi(out))
        }
    }
}

fn v2(spec: &ScoreSpec, classes: Option<usize>, body: &Value) -> Result<Scores, ExtractError> {
    let name = spec.output.as_deref().unwrap_or("");
    let output = body
        .get("outputs")
        .and_then(Value::as_array)
        .and_then(|outs| {
            outs.iter()
                .find(|o| o.get("name").and_then(Value::as_str) == Some(name))
        })
        .ok_or_else(|| ExtractError::Missing(format!("output {name:?}")))?;
    let shape: Vec<usize> = output
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| ExtractError::Missing(format!("shape of output {name:?}")))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| ExtractError::Shape("shape must be non-negative integers".into()))?;
    let mut flat = Vec::new();
    flatten(
        output
            .get("data")
            .ok_or_else(|| ExtractError::Missing(format!("data of output {name:?}")))?,
        &mut flat,
    )?;
    let (n, k) = match shape.as_slice() {
        [] => (1, 1),
        [n] => (*n, 1),
        [n, rest @ ..] => (*n, rest.iter().product::<usize>()),
    };
    if n.checked_mul(k) != Some(flat.len()) {
        return Err(ExtractError::Shape(format!(
            "shape {shape:?} does not match {} values",
            flat.len()
        )));
    }
    match classes {
        None => {
            let c = match spec.column {
                Some(c) if c < k => c,
                None if k == 1 => 0,
                Some(c) => {
                    return Err(ExtractError::Shape(format!(
                        "output has {k} columns, no column {c}"
                    )))
                }
                None => {
                    return Err(ExtractError::Shape(format!(
                        "output has {k} columns; the route names no column"
                    )))
                }
            };
            (0..n)
                .map(|i| number(flat[i * k + c], i))
                .collect::<Result<_, _>>()
                .map(Scores::Binary)
        }
        Some(classes) => {
            if k != classes {
                return Err(ExtractError::Shape(format!(
                    "output has {k} columns for {classes} classes"
                )));
            }
            (0..n)
                .map(|i| {
                    flat[i * k..(i + 1) * k]
                        .iter()
                        .map(|v| number(v, i))
                        .collect::<Result<Vec<_>, _>>()
                })
                .collect::<Result<_, _>>()
                .map(Scores::Multi)
        }
    }
}

/// Row-major flattening of nested arrays.
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) -> Result<(), ExtractError> {
    match v {
        Value::Array(a) => a.iter().try_for_each(|x| flatten(x, out)),
        v => {
            out.push(v);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(output: Option<&str>, column: Option<usize>, pointer: Option<&str>) -> ScoreSpec {
        ScoreSpec {
            output: output.map(String::from),
            column,
            pointer: pointer.map(String::from),
            range: [0.0, 1.0],
        }
    }

    #[test]
    fn v2_n_by_2_probabilities_flat_and_nested() {
        let flat = json!({"outputs": [
            {"name": "label", "shape": [3], "datatype": "INT64", "data": [1, 0, 1]},
            {"name": "predict_proba", "shape": [3, 2], "datatype": "FP64",
             "data": [0.1, 0.9, 0.8, 0.2, 0.45, 0.55]}]});
        let s = spec(Some("predict_proba"), Some(1), None);
        assert_eq!(
            extract(Protocol::V2, &s, None, &flat).unwrap(),
            Scores::Binary(vec![0.9, 0.2, 0.55])
        );
        let nested = json!({"outputs": [{"name": "predict_proba", "shape": [3, 2],
            "data": [[0.1, 0.9], [0.8, 0.2], [0.45, 0.55]]}]});
        assert_eq!(
            extract(Protocol::V2, &s, None, &nested).unwrap(),
            Scores::Binary(vec![0.9, 0.2, 0.55])
        );
        assert_eq!(
            extract(
                Protocol::V2,
                &spec(Some("predict_proba"), None, None),
                Some(2),
                &flat
            )
            .unwrap(),
            Scores::Multi(vec![vec![0.1, 0.9], vec![0.8, 0.2], vec![0.45, 0.55]])
        );
    }

    #[test]
    fn v2_errors_are_named() {
        let s = spec(Some("p"), Some(1), None);
        let bad_shape =
            json!({"outputs": [{"name": "p", "shape": [2, 2], "data": [0.1, 0.9, 0.8]}]});
        assert_eq!(
            extract(Protocol::V2, &s, None, &bad_shape)
                .unwrap_err()
                .kind(),
            "shape"
        );
        let missing = json!({"outputs": [{"name": "q", "shape": [1], "data": [0.1]}]});
        assert_eq!(
            extract(Protocol::V2, &s, None, &missing)
                .unwrap_err()
                .kind(),
            "missing"
        );
        let not_num = json!({"outputs": [{"name": "p", "shape": [1, 2], "data": [0.1, "NaN"]}]});
        assert_eq!(
            extract(Protocol::V2, &s, None, &not_num)
                .unwrap_err()
                .kind(),
            "not_a_number"
        );
        let no_col = json!({"outputs": [{"name": "p", "shape": [1, 2], "data": [0.1, 0.2]}]});
        assert_eq!(
            extract(Protocol::V2, &spec(Some("p"), None, None), None, &no_col)
                .unwrap_err()
                .kind(),
            "shape"
        );
        let empty = json!({"outputs": [{"name": "p", "shape": [0, 2], "data": []}]});
        assert_eq!(
            extract(Protocol::V2, &s, None, &empty).unwrap_err(),
            ExtractError::Empty
        );
    }

    #[test]
    fn v1_predictions() {
        let body = json!({"predictions": [0.2, 0.7]});
        assert_eq!(
            extract(Protocol::V1, &spec(None, None, None), None, &body).unwrap(),
            Scores::Binary(vec![0.2, 0.7])
        );
        let cols = json!({"predictions": [[0.8, 0.2], [0.3, 0.7]]});
        assert_eq!(
            extract(Protocol::V1, &spec(None, Some(1), None), None, &cols).unwrap(),
            Scores::Binary(vec![0.2, 0.7])
        );
        assert_eq!(
            extract(Protocol::V1, &spec(None, None, None), Some(2), &cols).unwrap(),
            Scores::Multi(vec![vec![0.8, 0.2], vec![0.3, 0.7]])
        );
    }

    #[test]
    fn json_pointer_with_a_wildcard() {
        let body = json!({"results": [{"score": 0.3}, {"score": 0.95}]});
        let s = spec(None, None, Some("/results/*/score"));
        assert_eq!(
            extract(Protocol::Json, &s, None, &body).unwrap(),
            Scores::Binary(vec![0.3, 0.95])
        );
        let single = json!({"fraud": {"p": 0.4}});
        assert_eq!(
            extract(
                Protocol::Json,
                &spec(None, None, Some("/fraud/p")),
                None,
                &single
            )
            .unwrap(),
            Scores::Binary(vec![0.4])
        );
        let missing = json!({"results": [{"score": 0.3}, {"other": 1}]});
        assert_eq!(
            extract(Protocol::Json, &s, None, &missing)
                .unwrap_err()
                .kind(),
            "missing"
        );
    }
}
