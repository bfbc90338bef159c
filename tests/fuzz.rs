//! Property-based fuzzing (proptest) of the three parsers that take untrusted or hand-written
//! input: policy files, model responses (score extraction) and provenance tags. None may panic,
//! whatever the input; each runs a bounded number of cases (PROPTEST_CASES raises it).

use proptest::prelude::*;
use serde_json::Value;
use sluicegate::config::policy::{Protocol, ScoreSpec};
use sluicegate::config::validate::parse;
use sluicegate::decide::extract::extract;
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

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
