use super::*;
use crate::config::policy::ScoreSpec;
use crate::decide::RowDecision;

fn decided(actions: &[&str]) -> Decided {
    Decided {
        rows: actions
            .iter()
            .map(|a| RowDecision {
                score: 0.5,
                class_scores: None,
                threshold: Some(0.5),
                threshold_mode: Some("fixed"),
                model_action: (*a).into(),
                final_action: (*a).into(),
                limit: LimitOutcome::Ok,
                explored: false,
                propensity: None,
            })
            .collect(),
        rejected: None,
        events: Vec::new(),
    }
}

/// The decision headers of `d` on a response that already carries an id, a tag of
/// `tag_len` bytes and `upstream` headers.
fn headers_of(
    d: &Decided,
    counted: Counted,
    rejected: bool,
    tag_len: usize,
    upstream: &[(&str, &str)],
) -> http::HeaderMap {
    let policy = Policy::new(Default::default(), 0, 1 << 20, None);
    let mut h = http::HeaderMap::new();
    h.insert(
        super::super::ID_HEADER,
        HeaderValue::from_static("019ad5a4-8e52-7c4e-9b3a-5d1c2e3f4a5b"),
    );
    if tag_len > 0 {
        h.insert(TAG_HEADER, "t".repeat(tag_len).parse().unwrap());
    }
    for (k, v) in upstream {
        h.insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    decision_headers(&mut h, d, &policy, counted, rejected);
    h
}

fn text<'a>(h: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

const ALL: Counted = Counted {
    limits: true,
    model_actions: true,
};

/// `n` rows, every `every`-th one `spam` (the rest `ham`); a `spam` row past the first
/// `keep` is a fallback to `ham`.
fn batch(n: usize, every: usize, keep: usize) -> Decided {
    let mut d = decided(&vec!["ham"; n]);
    for (i, r) in d
        .rows
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| i % every == 0)
    {
        r.model_action = "spam".into();
        if i / every < keep {
            r.final_action = "spam".into();
        } else {
            r.limit = LimitOutcome::Fallback;
        }
    }
    d
}

#[test]
fn headers_list_each_row_up_to_64_rows_and_count_past_it() {
    let h = headers_of(&batch(64, 10, 3), ALL, false, 0, &[]);
    assert_eq!(text(&h, "sluicegate-rows"), Some("64"));
    let actions = text(&h, "sluicegate-action").unwrap();
    assert_eq!(actions.split(',').count(), 64);
    assert!(actions.starts_with("spam,ham,"), "{actions}");
    assert_eq!(
        text(&h, "sluicegate-limit")
            .unwrap()
            .matches("fallback")
            .count(),
        4
    );
    assert_eq!(
        text(&h, "sluicegate-threshold").unwrap().split(',').count(),
        64
    );
    assert!(text(&h, "sluicegate-action-counts").is_none());
    assert!(text(&h, "sluicegate-policy").is_some());

    // 65 rows: 7 the model calls spam, 3 kept, 4 fallen back to ham.
    let h = headers_of(&batch(65, 10, 3), ALL, false, 0, &[]);
    assert_eq!(text(&h, "sluicegate-rows"), Some("65"));
    for per_row in [
        "sluicegate-action",
        "sluicegate-model-action",
        "sluicegate-limit",
        "sluicegate-threshold",
    ] {
        assert!(h.get(per_row).is_none(), "{per_row}");
    }
    assert_eq!(text(&h, "sluicegate-action-counts"), Some("ham=62,spam=3"));
    assert_eq!(
        text(&h, "sluicegate-model-action-counts"),
        Some("ham=58,spam=7")
    );
    assert_eq!(
        text(&h, "sluicegate-limit-counts"),
        Some("ok=61,fallback=4")
    );

    // A route without limits or exploration: its other counts would repeat the first.
    let plain = Counted {
        limits: false,
        model_actions: false,
    };
    let h = headers_of(&decided(&["ham"; 65]), plain, false, 0, &[]);
    assert_eq!(text(&h, "sluicegate-action-counts"), Some("ham=65"));
    assert!(h.get("sluicegate-model-action-counts").is_none());
    assert!(h.get("sluicegate-limit-counts").is_none());
}

#[test]
fn a_refused_batch_counts_rejected_beside_what_the_model_wanted() {
    let h = headers_of(&batch(100, 4, 0), ALL, true, 0, &[]);
    assert_eq!(text(&h, "sluicegate-action-counts"), Some("rejected=100"));
    assert_eq!(
        text(&h, "sluicegate-model-action-counts"),
        Some("ham=75,spam=25")
    );
    let h = headers_of(&batch(3, 2, 0), ALL, true, 0, &[]);
    assert_eq!(
        text(&h, "sluicegate-action"),
        Some("rejected,rejected,rejected")
    );
    assert_eq!(text(&h, "sluicegate-model-action"), Some("spam,ham,spam"));
}

#[test]
fn counts_are_ordered_by_count_then_by_name() {
    let rows = ["b", "a", "c", "c", "b", "d", "c"];
    assert_eq!(counts(rows.into_iter(), 100), "c=3,b=2,a=1,d=1");
    // Cut to fit: the rest is summed, and the whole stays within its room.
    let cut = counts(rows.into_iter(), 16);
    assert_eq!(cut, "c=3,(3 more)=4");
    assert_eq!(counts(rows.into_iter(), 0), "(4 more)=7");

    // More distinct values than the short scan holds, interleaved: the same order.
    let names: Vec<String> = (0..20).map(|i| format!("v{i:02}")).collect();
    let rows: Vec<&str> = (0..3)
        .flat_map(|round| {
            names
                .iter()
                .enumerate()
                .filter(move |(i, _)| round <= i % 3)
                .map(|(_, v)| v.as_str())
        })
        .collect();
    let all = counts(rows.into_iter(), 1000);
    assert!(
        all.starts_with("v02=3,v05=3,v08=3,v11=3,v14=3,v17=3,v01=2,v04=2,"),
        "{all}"
    );
    assert!(all.ends_with(",v15=1,v18=1"), "{all}");
    assert_eq!(all.split(',').count(), 20);
}

#[test]
fn all_sluicegate_headers_stay_under_the_budget_for_any_batch() {
    let size = |h: &http::HeaderMap| sluicegate_bytes(h);
    // 10,000 rows of two actions, beside an Ed25519 tag of a large batch (about 440 bytes).
    let h = headers_of(&batch(10_000, 500, 3), ALL, false, 440, &[]);
    assert_eq!(
        text(&h, "sluicegate-action-counts"),
        Some("ham=9997,spam=3")
    );
    assert_eq!(
        text(&h, "sluicegate-limit-counts"),
        Some("ok=9983,fallback=17")
    );
    eprintln!(
        "10,000 rows, 2 actions, 440-byte tag: sluicegate-* headers {} bytes",
        size(&h)
    );
    assert!(size(&h) < HEADER_BUDGET);

    // 10,000 rows over 1,000 distinct 30-byte actions: counted as far as they fit, the
    // rest summed, and nothing lost from the total.
    let names: Vec<String> = (0..1000)
        .map(|i| format!("class-{i:04}-{}", "x".repeat(19)))
        .collect();
    let mut d = decided(&["ham"; 10_000]);
    for (i, r) in d.rows.iter_mut().enumerate() {
        r.final_action = names[i % 1000].as_str().into();
        r.model_action = names[(i + 1) % 1000].as_str().into();
    }
    let h = headers_of(&d, ALL, false, 440, &[]);
    eprintln!(
        "10,000 rows, 1,000 actions, 440-byte tag: sluicegate-* headers {} bytes",
        size(&h)
    );
    assert!(size(&h) < HEADER_BUDGET, "{h:?}");
    for name in ["sluicegate-action-counts", "sluicegate-model-action-counts"] {
        let value = text(&h, name).unwrap();
        let (listed, rest) = value.rsplit_once(",(").unwrap();
        assert!(listed.split(',').count() > 5, "{name}: {value}");
        let total: u64 = listed
            .split(',')
            .chain([rest])
            .map(|pair| pair.rsplit_once('=').unwrap().1.parse::<u64>().unwrap())
            .sum();
        assert_eq!(total, 10_000, "{name}: {value}");
    }
    assert_eq!(text(&h, "sluicegate-limit-counts"), Some("ok=10000"));

    // 64 rows whose thresholds would not fit: the rest is listed, the thresholds left out.
    let mut d = decided(&["ham"; 64]);
    for r in &mut d.rows {
        r.threshold = Some(0.1 + 0.2);
    }
    let h = headers_of(&d, ALL, false, 440, &[]);
    assert_eq!(
        text(&h, "sluicegate-action").unwrap().split(',').count(),
        64
    );
    assert_eq!(text(&h, "sluicegate-limit").unwrap().split(',').count(), 64);
    assert!(h.get("sluicegate-threshold").is_none());
    assert!(size(&h) < HEADER_BUDGET);

    // 64 rows whose per-row actions would not fit: counted, though at most 64 rows.
    let long = "a-rather-long-action-name";
    let h = headers_of(&decided(&[long; 64]), ALL, false, 440, &[]);
    assert!(h.get("sluicegate-action").is_none());
    assert_eq!(
        text(&h, "sluicegate-action-counts"),
        Some(&*format!("{long}=64"))
    );
    assert!(size(&h) < HEADER_BUDGET);
}

#[test]
fn decision_headers_the_upstream_sent_are_replaced() {
    let h = headers_of(
        &decided(&["ham"; 65]),
        ALL,
        false,
        0,
        &[
            ("sluicegate-action", "spam"),
            ("sluicegate-threshold", "0.1"),
        ],
    );
    assert!(h.get("sluicegate-action").is_none());
    assert!(h.get("sluicegate-threshold").is_none());
    assert_eq!(text(&h, "sluicegate-action-counts"), Some("ham=65"));
}

#[test]
fn actions_are_spliced_into_v2_outputs_leaving_the_rest_byte_for_byte() {
    let body = Bytes::from_static(
            br#"{"model_name":"m", "outputs" : [ {"name":"p","shape":[2],"datatype":"FP64","data":[1.50, 2e-3]} ] , "id":"x"}"#,
        );
    let spliced = splice_v2_actions(&body, &decided(&["spam", "ham"]), None).unwrap();
    let text = std::str::from_utf8(&spliced).unwrap();
    // The model's numbers and spacing are untouched; the tensor closes the array.
    assert!(text.starts_with(
            r#"{"model_name":"m", "outputs" : [ {"name":"p","shape":[2],"datatype":"FP64","data":[1.50, 2e-3]} ,"#
        ));
    assert!(text.ends_with(r#"] , "id":"x"}"#));
    let v: Value = serde_json::from_str(text).unwrap();
    assert_eq!(
        v["outputs"][1],
        json!({"name": "sluicegate_action", "shape": [2], "datatype": "BYTES", "data": ["spam", "ham"]})
    );
    // Byte for byte what the parsed-value path writes too.
    assert!(text.contains(
        r#"{"name":"sluicegate_action","shape":[2],"datatype":"BYTES","data":["spam","ham"]}"#
    ));

    let empty = Bytes::from_static(br#"{"outputs":[ ]}"#);
    let v: Value =
        serde_json::from_slice(&splice_v2_actions(&empty, &decided(&["ham"]), None).unwrap())
            .unwrap();
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1);

    // Nothing to splice into: the caller rewrites the parsed value instead.
    for body in [
        &br#"{"outputs":{}}"#[..],
        br#"{"x":1}"#,
        br#"[1]"#,
        b"not json",
    ] {
        assert!(
            splice_v2_actions(&Bytes::copy_from_slice(body), &decided(&["ham"]), None).is_none()
        );
    }
}

#[test]
fn the_splice_point_found_while_reading_the_scores_is_where_a_scan_finds_it() {
    let p = r#"{"name":"p","shape":[2],"datatype":"FP64","data":[0.1,0.9]}"#;
    let q = r#"{"name":"q","shape":[1],"datatype":"INT64","data":[3]}"#;
    let cases = [
        // (body, whether the score read can tell where `outputs` ends)
        (format!(r#"{{"model_name":"m","outputs":[{p}]}}"#), true),
        (format!("{{\"outputs\" : [ {q} , {p} ] \n\t}} \r\n"), true),
        (format!(r#"{{"outputs":[{p}],"id":"x"}}"#), false),
        (format!(r#"{{"outputs":[],"outputs":[{p}]}}"#), false),
    ];
    let spec = ScoreSpec {
        output: Some("p".into()),
        column: None,
        pointer: None,
        range: [0.0, 1.0],
    };
    let decided = decided(&["spam", "ham"]);
    for (body, known) in cases {
        let read = extract_v2(&spec, None, body.as_bytes()).unwrap();
        assert_eq!(read.splice.is_some(), known, "{body}");
        let body = Bytes::from(body);
        assert_eq!(
            splice_v2_actions(&body, &decided, read.splice),
            splice_v2_actions(&body, &decided, None),
            "{body:?}"
        );
        if known {
            let v: Value =
                serde_json::from_slice(&splice_v2_actions(&body, &decided, read.splice).unwrap())
                    .unwrap();
            assert_eq!(
                v["outputs"].as_array().unwrap().last().unwrap()["name"],
                "sluicegate_action"
            );
        }
    }
}

#[test]
fn gzip_and_deflate_are_decoded_within_the_limit() {
    use std::io::Write;
    let plain = br#"{"outputs":[]}"#;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(plain).unwrap();
    let gz = Bytes::from(gz.finish().unwrap());
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), Default::default());
    zlib.write_all(plain).unwrap();
    let zlib = Bytes::from(zlib.finish().unwrap());
    let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), Default::default());
    raw.write_all(plain).unwrap();
    let raw = Bytes::from(raw.finish().unwrap());
    let headers = |coding: &str| {
        let mut h = http::HeaderMap::new();
        for c in coding.split(';') {
            h.append(header::CONTENT_ENCODING, c.parse().unwrap());
        }
        h
    };
    let decoded = |h: &http::HeaderMap, body: &Bytes, limit: u64| match decode_content(
        h,
        body.clone(),
        limit,
    ) {
        Ok(Decoded::Decoded(b)) => Ok(b),
        Ok(Decoded::Identity(_)) => panic!("not decoded"),
        Err((e, back)) => {
            assert_eq!(&back, body, "handed back as it was");
            Err(e.kind())
        }
    };
    for (coding, body) in [
        ("gzip", &gz),
        ("X-GZIP", &gz),
        ("identity, gzip", &gz),
        ("deflate", &zlib),
        ("deflate", &raw),
    ] {
        assert_eq!(
            decoded(&headers(coding), body, 100).unwrap(),
            &plain[..],
            "{coding}"
        );
    }
    assert!(matches!(
        decode_content(&http::HeaderMap::new(), gz.clone(), 100),
        Ok(Decoded::Identity(b)) if b == gz
    ));
    assert!(matches!(
        decode_content(&headers("identity"), gz.clone(), 100),
        Ok(Decoded::Identity(_))
    ));
    // Exactly at the limit decodes; one byte less does not (a gzip bomb stops there).
    let n = plain.len() as u64;
    assert!(decoded(&headers("gzip"), &gz, n).is_ok());
    assert_eq!(
        decoded(&headers("gzip"), &gz, n - 1),
        Err("response_too_large")
    );
    for coding in ["br", "gzip, gzip", "gzip;deflate", "zstd"] {
        assert_eq!(
            decoded(&headers(coding), &gz, 100),
            Err("content_encoding"),
            "{coding}"
        );
    }
    let broken = Bytes::from_static(b"\x1f\x8b not really gzip");
    assert_eq!(
        decoded(&headers("gzip"), &broken, 100),
        Err("content_encoding")
    );
    assert_eq!(
        decoded(&headers("deflate"), &broken, 100),
        Err("content_encoding")
    );
}

#[test]
fn pointers_are_set_where_their_parent_exists() {
    let mut v = json!({"result": {"score": 0.3}});
    assert!(set_pointer(&mut v, "/result/action", json!("spam")));
    assert_eq!(v["result"]["action"], "spam");
    assert!(set_pointer(&mut v, "/top", json!(1)));
    assert!(!set_pointer(&mut v, "/missing/action", json!(1)));
}
