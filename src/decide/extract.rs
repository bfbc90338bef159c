//! Score extraction: where each row's score is in a response, by declared protocol.
//!
//! - v1 (TF-Serving/KServe v1): `predictions[i]` is a number, or an array of class scores
//!   (`column` picks one for a binary route).
//! - v2 (Open Inference Protocol): the output named in the route; `data` is row-major, flat or
//!   nested, so row i, column c of an output of shape `[n, k]` is the flat `data[i*k + c]`.
//! - json: a JSON pointer with one `*` segment standing for the batch's rows.

use serde_json::Value;

use crate::config::policy::{Protocol, ScoreSpec};
use crate::oip::{self, ModelInferResponse};

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
        .ok_or_else(|| missing_output(name))?;
    let shape = shape_of(name, output.get("shape"))?;
    let mut cells = Vec::new();
    flatten(
        output
            .get("data")
            .ok_or_else(|| ExtractError::Missing(format!("data of output {name:?}")))?,
        &mut cells,
    )?;
    let flat: Vec<Option<f64>> = cells
        .into_iter()
        .map(|v| v.as_f64().filter(|f| f.is_finite()))
        .collect();
    v2_rows(spec, classes, &shape, &flat)
}

fn missing_output(name: &str) -> ExtractError {
    ExtractError::Missing(format!("output {name:?}"))
}

/// An output's `shape`: non-negative integers.
fn shape_of(name: &str, shape: Option<&Value>) -> Result<Vec<usize>, ExtractError> {
    shape
        .and_then(Value::as_array)
        .ok_or_else(|| ExtractError::Missing(format!("shape of output {name:?}")))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| ExtractError::Shape("shape must be non-negative integers".into()))
}

/// The rows of a v2 output of `shape` whose row-major `flat` data holds a finite number, or
/// `None` for any other value, at each position.
fn v2_rows(
    spec: &ScoreSpec,
    classes: Option<usize>,
    shape: &[usize],
    flat: &[Option<f64>],
) -> Result<Scores, ExtractError> {
    let (n, k) = match shape {
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
    let number = |i: usize, row: usize| flat[i].ok_or(ExtractError::NotANumber { row });
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
                .map(|i| number(i * k + c, i))
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
                    (i * k..(i + 1) * k)
                        .map(|j| number(j, i))
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

/// What a deciding v2 route reads from a response: the scores, and the model's name and
/// version (claims of the tag).
#[derive(Clone, Debug, PartialEq)]
pub struct V2Read {
    pub scores: Scores,
    pub model_name: Option<String>,
    pub model_version: Option<String>,
    /// Where an output could be appended to `outputs`, when the same pass could tell.
    pub splice: Option<SplicePoint>,
}

/// The closing bracket of the top-level `outputs` array, found while reading the scores so
/// that writing the decisions into the body needs no second scan of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplicePoint {
    /// Byte offset of the `]` that closes `outputs`.
    pub close: usize,
    /// `outputs` held no element (no comma goes before an appended one).
    pub empty: bool,
}

/// [`extract`] for a v2 response, straight from its bytes, in one pass: only the route's output
/// is read into numbers; every other value is skipped as it is scanned (no `Value` of the whole
/// answer, no string copied but the model's name and version). Same results and errors as
/// parsing the bytes into a `Value` and calling [`extract`] with [`Protocol::V2`] (tested).
pub fn extract_v2(
    spec: &ScoreSpec,
    classes: Option<usize>,
    bytes: &[u8],
) -> Result<V2Read, ExtractError> {
    let name = spec.output.as_deref().unwrap_or("");
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let top = serde::de::DeserializeSeed::deserialize(v2read::Top { name }, &mut de)
        .and_then(|top| de.end().map(|()| top))
        .map_err(|_| ExtractError::NotJson)?;
    let output = top.output.ok_or_else(|| missing_output(name))?;
    let shape = shape_of(name, output.shape.as_ref())?;
    let flat = output
        .data
        .ok_or_else(|| ExtractError::Missing(format!("data of output {name:?}")))?;
    let scores = v2_rows(spec, classes, &shape, &flat)?;
    if scores.rows() == 0 {
        return Err(ExtractError::Empty);
    }
    let splice = top.outputs_last.and_then(|empty| {
        closing_bracket_of_last_member(bytes).map(|close| SplicePoint { close, empty })
    });
    Ok(V2Read {
        scores,
        model_name: top.model_name,
        model_version: top.model_version,
        splice,
    })
}

/// [`extract_v2`] for a gRPC `ModelInferResponse`: the route's output read from its typed
/// `contents` or, when the response carries `raw_output_contents`, from the raw entry at the
/// output's position (little-endian, decoded by `datatype`, as Triton sends). Shape rules,
/// results and errors are REST's: the same rows of the same output give the same scores.
pub fn extract_grpc(
    spec: &ScoreSpec,
    classes: Option<usize>,
    response: &ModelInferResponse,
) -> Result<Scores, ExtractError> {
    let name = spec.output.as_deref().unwrap_or("");
    let (index, output) = response
        .outputs
        .iter()
        .enumerate()
        .find(|(_, o)| o.name == name)
        .ok_or_else(|| missing_output(name))?;
    let shape = output
        .shape
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ExtractError::Shape("shape must be non-negative integers".into()))?;
    let data = if response.raw_output_contents.is_empty() {
        let contents = output
            .contents
            .as_ref()
            .ok_or_else(|| ExtractError::Missing(format!("contents of output {name:?}")))?;
        oip::typed_data(&output.datatype, contents)
    } else {
        let raw = response.raw_output_contents.get(index).ok_or_else(|| {
            ExtractError::Missing(format!("raw_output_contents of output {name:?}"))
        })?;
        oip::raw_data(&output.datatype, raw)
    };
    let flat = data
        .map_err(|e| ExtractError::Shape(e.to_string()))?
        .numbers();
    let scores = v2_rows(spec, classes, &shape, &flat)?;
    if scores.rows() == 0 {
        return Err(ExtractError::Empty);
    }
    Ok(scores)
}

/// In a JSON object whose last member's value is an array, the offset of that array's `]`:
/// the last non-whitespace byte before the object's closing `}`.
fn closing_bracket_of_last_member(bytes: &[u8]) -> Option<usize> {
    let is_ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let brace = bytes.iter().rposition(|b| !is_ws(b))?;
    let close = bytes[..brace].iter().rposition(|b| !is_ws(b))?;
    (bytes[brace] == b'}' && bytes[close] == b']').then_some(close)
}

/// The one-pass reader behind [`extract_v2`]. Every visitor takes any JSON value (what it does
/// not want it skips), so the only errors are the text's own: not JSON.
mod v2read {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;
    use serde_json::value::RawValue;
    use serde_json::Value;

    use super::Flat;

    /// What the top level held: the first output named as wanted, the model's name and version.
    #[derive(Default)]
    pub(super) struct Found {
        pub output: Option<Output>,
        pub model_name: Option<String>,
        pub model_version: Option<String>,
        /// `outputs` is an array, the object's last member and its only `outputs` key:
        /// `Some(empty)`. Then its closing bracket is the body's last `]`.
        pub outputs_last: Option<bool>,
    }

    pub(super) struct Output {
        pub shape: Option<Value>,
        /// Finite numbers, `None` for any other value; absent when the output has no data.
        pub data: Option<Vec<Option<f64>>>,
    }

    #[derive(Deserialize)]
    #[serde(field_identifier, rename_all = "snake_case")]
    enum TopKey {
        ModelName,
        ModelVersion,
        Outputs,
        #[serde(other)]
        Other,
    }

    #[derive(Deserialize)]
    #[serde(field_identifier, rename_all = "snake_case")]
    enum OutputKey {
        Name,
        Shape,
        Data,
        #[serde(other)]
        Other,
    }

    /// Skips any scalar a visitor did not want.
    macro_rules! skip_scalars {
        ($value:expr) => {
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok($value)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok($value)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok($value)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok($value)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok($value)
            }
        };
    }

    pub(super) struct Top<'n> {
        pub name: &'n str,
    }

    impl<'de> DeserializeSeed<'de> for Top<'_> {
        type Value = Found;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Found, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Top<'_> {
        type Value = Found;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a v2 response")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
            let mut found = Found::default();
            let mut outputs_keys = 0;
            while let Some(key) = map.next_key::<TopKey>()? {
                found.outputs_last = None;
                match key {
                    TopKey::ModelName => found.model_name = map.next_value::<Text>()?.0,
                    TopKey::ModelVersion => found.model_version = map.next_value::<Text>()?.0,
                    // A repeated key: the last one counts, as in a parsed value.
                    TopKey::Outputs => {
                        outputs_keys += 1;
                        let read = map.next_value_seed(Outputs { name: self.name })?;
                        found.output = read.output;
                        found.outputs_last = read.array_empty.filter(|_| outputs_keys == 1);
                    }
                    TopKey::Other => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(found)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Found, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Found::default())
        }

        fn visit_str<E>(self, _: &str) -> Result<Found, E> {
            Ok(Found::default())
        }

        skip_scalars!(Found::default());
    }

    /// `outputs`: the first element that is an object named as wanted.
    struct Outputs<'n> {
        name: &'n str,
    }

    /// What `outputs` held: the output wanted, and whether it was an (empty) array.
    #[derive(Default)]
    struct OutputsRead {
        output: Option<Output>,
        array_empty: Option<bool>,
    }

    impl<'de> DeserializeSeed<'de> for Outputs<'_> {
        type Value = OutputsRead;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<OutputsRead, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Outputs<'_> {
        type Value = OutputsRead;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("the outputs")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OutputsRead, A::Error> {
            let mut found = None;
            let mut empty = true;
            while let Some(output) = seq.next_element_seed(OneOutput {
                name: self.name,
                wanted: found.is_none(),
            })? {
                empty = false;
                found = found.or(output);
            }
            Ok(OutputsRead {
                output: found,
                array_empty: Some(empty),
            })
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OutputsRead, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(OutputsRead::default())
        }

        fn visit_str<E>(self, _: &str) -> Result<OutputsRead, E> {
            Ok(OutputsRead::default())
        }

        skip_scalars!(OutputsRead::default());
    }

    /// One element of `outputs`; `wanted` is false once the output was found.
    struct OneOutput<'n> {
        name: &'n str,
        wanted: bool,
    }

    impl<'de> DeserializeSeed<'de> for OneOutput<'_> {
        type Value = Option<Output>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Output>, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for OneOutput<'_> {
        type Value = Option<Output>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an output")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Output>, A::Error> {
            // Servers write `name` before `data`; when one does not, the data is held as raw
            // text and read only if the name turns out to be the one wanted.
            let mut named: Option<bool> = None;
            let mut shape = None;
            let mut data = None;
            let mut raw_data: Option<&'de RawValue> = None;
            while let Some(key) = map.next_key::<OutputKey>()? {
                match key {
                    OutputKey::Name => {
                        named = Some(map.next_value::<Text>()?.0.as_deref() == Some(self.name))
                    }
                    OutputKey::Shape if self.wanted => shape = Some(map.next_value::<Value>()?),
                    OutputKey::Data if self.wanted && named == Some(true) => {
                        let mut flat = Vec::new();
                        map.next_value_seed(Flat(&mut flat))?;
                        data = Some(flat);
                        raw_data = None;
                    }
                    OutputKey::Data if self.wanted && named.is_none() => {
                        raw_data = Some(map.next_value()?);
                        data = None;
                    }
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            if !self.wanted || named != Some(true) {
                return Ok(None);
            }
            if let Some(raw) = raw_data {
                let mut flat = Vec::new();
                let mut de = serde_json::Deserializer::from_str(raw.get());
                Flat(&mut flat)
                    .deserialize(&mut de)
                    .map_err(serde::de::Error::custom)?;
                data = Some(flat);
            }
            Ok(Some(Output { shape, data }))
        }

        fn visit_str<E>(self, _: &str) -> Result<Option<Output>, E> {
            Ok(None)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Output>, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }

        skip_scalars!(None);
    }

    /// A JSON string's text; `None` for any other value (as `Value::as_str`).
    struct Text(Option<String>);

    impl<'de> Deserialize<'de> for Text {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
            d.deserialize_any(TextVisitor)
        }
    }

    struct TextVisitor;

    impl<'de> Visitor<'de> for TextVisitor {
        type Value = Text;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any value")
        }

        fn visit_str<E>(self, v: &str) -> Result<Text, E> {
            Ok(Text(Some(v.to_owned())))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Text(None))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Text(None))
        }

        skip_scalars!(Text(None));
    }
}

/// Flattens nested arrays row-major into finite numbers (`None` for any other value), without
/// building the values.
struct Flat<'v>(&'v mut Vec<Option<f64>>);

impl<'de> serde::de::DeserializeSeed<'de> for Flat<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Flat<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number or nested arrays of numbers")
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.0.push(Some(v).filter(|f| f.is_finite()));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.push(Some(v as f64));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0.push(Some(v as f64));
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flat(self.0))?.is_some() {}
        Ok(())
    }

    // Anything else is a value that is not a number: one cell, which fails if it is read.
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        self.0.push(None);
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        self.0.push(None);
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        self.0.push(None);
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.push(None);
        Ok(())
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

    /// A v2 body read both ways — parsed, and straight from its bytes — which must agree.
    fn v2_both(
        spec: &ScoreSpec,
        classes: Option<usize>,
        body: &Value,
    ) -> Result<Scores, ExtractError> {
        let from_value = extract(Protocol::V2, spec, classes, body);
        let from_bytes = extract_v2(spec, classes, body.to_string().as_bytes());
        match (&from_value, &from_bytes) {
            (Ok(a), Ok(b)) => assert_eq!(*a, b.scores),
            (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind()),
            _ => panic!("{from_value:?} vs {from_bytes:?}"),
        }
        from_value
    }

    use crate::oip::InferTensorContents;

    /// A gRPC response with one FP32 output, typed or raw.
    fn grpc_response(name: &str, shape: Vec<i64>, values: &[f32], raw: bool) -> ModelInferResponse {
        use crate::oip::InferOutputTensor;
        let mut output = InferOutputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape,
            ..Default::default()
        };
        let mut response = ModelInferResponse::default();
        if raw {
            response.raw_output_contents =
                vec![values.iter().flat_map(|v| v.to_le_bytes()).collect()];
        } else {
            output.contents = Some(InferTensorContents {
                fp32_contents: values.to_vec(),
                ..Default::default()
            });
        }
        response.outputs.push(output);
        response
    }

    #[test]
    fn grpc_scores_are_the_rest_scores_of_the_same_output_typed_or_raw() {
        let values = [0.1f32, 0.9, 0.7, 0.3, 0.25, 0.75];
        let binary = spec(Some("predict_proba"), Some(1), None);
        let rest = json!({"outputs": [{"name": "predict_proba", "shape": [3, 2],
            "data": values.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()}]});
        let expected = v2_both(&binary, None, &rest).unwrap();
        for raw in [false, true] {
            let r = grpc_response("predict_proba", vec![3, 2], &values, raw);
            assert_eq!(
                extract_grpc(&binary, None, &r).unwrap(),
                expected,
                "raw {raw}"
            );
            let multi = spec(Some("predict_proba"), None, None);
            assert_eq!(
                extract_grpc(&multi, Some(2), &r).unwrap(),
                v2_both(&multi, Some(2), &rest).unwrap()
            );
        }
    }

    #[test]
    fn grpc_reads_fail_as_rest_reads_do() {
        let s = spec(Some("p"), None, None);
        for raw in [false, true] {
            let kind = |r: &ModelInferResponse| extract_grpc(&s, None, r).unwrap_err().kind();
            assert_eq!(
                kind(&grpc_response("other", vec![1], &[0.5], raw)),
                "missing"
            );
            assert_eq!(kind(&grpc_response("p", vec![3], &[0.5], raw)), "shape");
            assert_eq!(kind(&grpc_response("p", vec![-1], &[0.5], raw)), "shape");
            assert_eq!(
                kind(&grpc_response("p", vec![1], &[f32::NAN], raw)),
                "not_a_number"
            );
            assert_eq!(kind(&grpc_response("p", vec![0], &[], raw)), "empty");
        }
        let mut cut = grpc_response("p", vec![1], &[0.5], true);
        cut.raw_output_contents[0].pop();
        assert_eq!(extract_grpc(&s, None, &cut).unwrap_err().kind(), "shape");
        let mut no_raw_entry = grpc_response("p", vec![1], &[0.5], true);
        no_raw_entry
            .outputs
            .insert(0, no_raw_entry.outputs[0].clone());
        no_raw_entry.outputs[0].name = "first".into();
        assert_eq!(
            extract_grpc(&s, None, &no_raw_entry).unwrap_err().kind(),
            "missing",
            "the second output has no raw entry"
        );
    }

    #[test]
    fn v2_read_from_bytes_names_the_model_and_fails_as_the_parsed_value_does() {
        let s = spec(Some("p"), None, None);
        let body = br#"{"model_name": "spam-filter", "model_version": "7", "id": "x",
            "outputs": [{"name": "other", "shape": [2], "data": ["a", {"deep": [1, 2]}]},
                        {"name": "p", "shape": [2], "data": [0.25, 1e2]}]}"#;
        let read = extract_v2(&s, None, body).unwrap();
        assert_eq!(read.scores, Scores::Binary(vec![0.25, 100.0]));
        assert_eq!(read.model_name.as_deref(), Some("spam-filter"));
        assert_eq!(read.model_version.as_deref(), Some("7"));
        // A server that writes `data` before `name`.
        let data_first = br#"{"outputs": [{"data": [0.5, 0.75], "shape": [2], "name": "p"}]}"#;
        assert_eq!(
            extract_v2(&s, None, data_first).unwrap().scores,
            Scores::Binary(vec![0.5, 0.75])
        );
        assert_eq!(
            extract_v2(&s, None, b"{\"outputs\": [").unwrap_err(),
            ExtractError::NotJson
        );
        assert_eq!(extract_v2(&s, None, b"42").unwrap_err().kind(), "missing");
        assert_eq!(
            extract_v2(&s, None, br#"{"outputs": 3}"#)
                .unwrap_err()
                .kind(),
            "missing"
        );
        assert_eq!(
            extract_v2(
                &s,
                None,
                br#"{"outputs": [7, {"name": "p", "shape": [1], "data": [null]}]}"#
            )
            .unwrap_err()
            .kind(),
            "not_a_number"
        );
    }

    #[test]
    fn v2_n_by_2_probabilities_flat_and_nested() {
        let flat = json!({"outputs": [
            {"name": "label", "shape": [3], "datatype": "INT64", "data": [1, 0, 1]},
            {"name": "predict_proba", "shape": [3, 2], "datatype": "FP64",
             "data": [0.1, 0.9, 0.8, 0.2, 0.45, 0.55]}]});
        let s = spec(Some("predict_proba"), Some(1), None);
        assert_eq!(
            v2_both(&s, None, &flat).unwrap(),
            Scores::Binary(vec![0.9, 0.2, 0.55])
        );
        let nested = json!({"outputs": [{"name": "predict_proba", "shape": [3, 2],
            "data": [[0.1, 0.9], [0.8, 0.2], [0.45, 0.55]]}]});
        assert_eq!(
            v2_both(&s, None, &nested).unwrap(),
            Scores::Binary(vec![0.9, 0.2, 0.55])
        );
        assert_eq!(
            v2_both(&spec(Some("predict_proba"), None, None), Some(2), &flat).unwrap(),
            Scores::Multi(vec![vec![0.1, 0.9], vec![0.8, 0.2], vec![0.45, 0.55]])
        );
    }

    #[test]
    fn v2_errors_are_named() {
        let s = spec(Some("p"), Some(1), None);
        let bad_shape =
            json!({"outputs": [{"name": "p", "shape": [2, 2], "data": [0.1, 0.9, 0.8]}]});
        assert_eq!(v2_both(&s, None, &bad_shape).unwrap_err().kind(), "shape");
        let missing = json!({"outputs": [{"name": "q", "shape": [1], "data": [0.1]}]});
        assert_eq!(v2_both(&s, None, &missing).unwrap_err().kind(), "missing");
        let not_num = json!({"outputs": [{"name": "p", "shape": [1, 2], "data": [0.1, "NaN"]}]});
        assert_eq!(
            v2_both(&s, None, &not_num).unwrap_err().kind(),
            "not_a_number"
        );
        let no_col = json!({"outputs": [{"name": "p", "shape": [1, 2], "data": [0.1, 0.2]}]});
        assert_eq!(
            v2_both(&spec(Some("p"), None, None), None, &no_col)
                .unwrap_err()
                .kind(),
            "shape"
        );
        let empty = json!({"outputs": [{"name": "p", "shape": [0, 2], "data": []}]});
        assert_eq!(v2_both(&s, None, &empty).unwrap_err(), ExtractError::Empty);
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
