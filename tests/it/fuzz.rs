//! Property-based fuzzing (proptest) of the three parsers that take untrusted or hand-written
//! input: policy files, model responses (score extraction) and provenance tags. None may panic,
//! whatever the input; each runs a bounded number of cases (PROPTEST_CASES raises it).

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::Value;
use sluicegate::config::policy::{Protocol, ScoreSpec};
use sluicegate::config::validate::parse;
use sluicegate::decide::extract::{extract, extract_v2};
use sluicegate::provenance::{decode_unverified, find_tags, KeyRing};

/// Arbitrary JSON values, a few levels deep, with the keys the parsers look for mixed in.
fn json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("outputs".to_string()),
        Just("name".to_string()),
        Just("shape".to_string()),
        Just("data".to_string()),
        Just("predictions".to_string()),
        Just("routes".to_string()),
        Just("match".to_string()),
        Just("decision".to_string()),
        Just("limits".to_string()),
        Just("threshold".to_string()),
        "[a-z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-zA-Z0-9 ./*:_-]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// v2 responses: an output `p` of shape `[n, k]` (sometimes misstated), its data flat or
/// nested, mostly finite numbers, now and then another value; beside a label output.
fn v2_body() -> impl Strategy<Value = Value> {
    let cell = prop_oneof![
        8 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        2 => any::<i32>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(Value::String("NaN".into())),
        1 => Just(serde_json::json!({"x": 1})),
    ];
    (0usize..6, 1usize..4)
        .prop_flat_map(move |(n, k)| {
            (
                Just((n, k)),
                prop::collection::vec(cell.clone(), n * k..=n * k + 1),
                any::<bool>(),
                prop::option::of(prop::collection::vec(0u64..7, 0..3)),
            )
        })
        .prop_map(|((n, k), cells, nested, misstated)| {
            let cells: Vec<Value> = cells
                .into_iter()
                .take(n * k + usize::from(n == 5))
                .collect();
            let data = if nested && cells.len() == n * k {
                Value::Array(cells.chunks(k).map(|r| Value::Array(r.to_vec())).collect())
            } else {
                Value::Array(cells)
            };
            let shape =
                misstated.map_or_else(|| serde_json::json!([n, k]), |s| serde_json::json!(s));
            serde_json::json!({
                "model_name": "m",
                "model_version": 3,
                "outputs": [
                    {"name": "label", "shape": [n], "data": vec![1; n]},
                    {"name": "p", "shape": shape, "datatype": "FP64", "data": data},
                ]
            })
        })
}

proptest! {
    // Regressions next to this file (tests/it/fuzz.proptest-regressions): the default would
    // put them in tests/proptest-regressions/, now that tests/it has a main.rs.
    #![proptest_config(ProptestConfig {
        cases: 1000,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    /// The request path reads v2 scores from the bytes without parsing the whole answer; it
    /// must agree with reading them from the parsed value, scores and errors alike.
    #[test]
    fn v2_scores_read_from_bytes_agree_with_the_parsed_value(
        v in prop_oneof![4 => v2_body(), 1 => json()],
        column in prop::option::of(0usize..4),
        classes in prop::option::of(1usize..4),
    ) {
        let spec = ScoreSpec { output: Some("p".into()), column, pointer: None, range: [0.0, 1.0] };
        // Both from the same text, as on the request path (serde_json's float parsing is not
        // exact to the last bit, but it is the same parsing either way).
        let text = v.to_string();
        let parsed: Value = serde_json::from_str(&text).unwrap();
        let from_value = extract(Protocol::V2, &spec, classes, &parsed);
        let from_bytes = extract_v2(&spec, classes, text.as_bytes());
        match (from_value, from_bytes) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(a, b.scores);
                prop_assert_eq!(b.model_name.as_deref(), v.get("model_name").and_then(Value::as_str));
                prop_assert_eq!(b.model_version, None::<String>, "a number is not a version string");
            }
            (Err(a), Err(b)) => prop_assert_eq!(a.kind(), b.kind(), "{} vs {}", a, b),
            (a, b) => prop_assert!(false, "the value says {:?}, the bytes {:?}", a, b),
        }
    }

    #[test]
    fn policy_parsing_never_panics_on_text(text in "(?s).{0,400}") {
        let _ = parse(&text, 1 << 20);
    }

    #[test]
    fn policy_parsing_never_panics_on_structures(v in json()) {
        let yaml = serde_yaml_ng::to_string(&v).unwrap_or_default();
        let _ = parse(&yaml, 1 << 20);
        let _ = parse(&v.to_string(), 1 << 20);
    }

    #[test]
    fn score_extraction_never_panics(
        v in json(),
        column in prop::option::of(0usize..5),
        classes in prop::option::of(0usize..5),
        pointer in prop_oneof![Just("/a/*/b".to_string()), Just("/*".to_string()), Just("/outputs/0/data".to_string()), "(/[a-z*]{0,3}){0,3}"],
    ) {
        for protocol in [Protocol::V1, Protocol::V2, Protocol::Json] {
            let spec = ScoreSpec {
                output: Some("name".into()),
                column,
                pointer: Some(pointer.clone()),
                range: [0.0, 1.0],
            };
            let _ = extract(protocol, &spec, classes, &v);
        }
    }

    #[test]
    fn tag_parsing_never_panics(
        payload in "[A-Za-z0-9_-]{0,300}",
        sig in "[A-Za-z0-9_-]{0,100}",
        noise in "(?s).{0,200}",
    ) {
        let ring = KeyRing::default();
        for token in [format!("sg1.{payload}.{sig}"), format!("sg1.{payload}"), noise.clone(), format!("sg1.{noise}")] {
            let _ = ring.verify(&token);
            let _ = decode_unverified(&token);
        }
    }

    #[test]
    fn tag_search_never_panics(v in json()) {
        let _ = find_tags(&v, 16);
    }
}
