//! Tests of tags and key rings. Keys are generated into temporary directories, so every test
//! also exercises `generate_key` and `KeyRing::load_dir`.

use std::fs;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;

use super::*;

/// An OpenSSL-written key pair (`openssl genpkey -algorithm ed25519`, `openssl pkey -pubout`).
const OPENSSL_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIHESz36+xbxRLzB1L/P6NQdhOVdXqBaome1bNhvRg2WF
-----END PRIVATE KEY-----
";
const OPENSSL_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAea+WVTZWEswWt/VIqsIdtszrI88m0KJDDoAr6kUyiPI=
-----END PUBLIC KEY-----
";
/// The same private key's 32-byte seed (from `openssl pkey -text`), hex.
const OPENSSL_SEED_HEX: &str = "7112cf7ebec5bc512f30752ff3fa350761395757a816a899ed5b361bd1836585";
/// `printf 'sg1.test' | openssl pkeyutl -sign -inkey key.pem -rawin | base64`.
const OPENSSL_SIG_OF_SG1_TEST: &str =
    "dbJtIcTnwexY7Ny42Qw0NCPBJj+w68QuzilAKjUog8iE9wbrerCar5tEXAuU/aqJ5ZQxIrC8ql/pbPXM0zGVDw==";

/// Seeded, so that the fuzz tests are repeatable.
struct Seeded(fastrand::Rng);

impl Seeded {
    fn new(seed: u64) -> Self {
        Seeded(fastrand::Rng::with_seed(seed))
    }

    fn next(&mut self) -> u64 {
        self.0.u64(..)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0.usize(..n.max(1))
    }
}

/// Claims input with placeholder names: id `i`, route `r`, policy `p`, time 0.
const PLACEHOLDER: ClaimsInput<'static> = ClaimsInput {
    prediction_id: "i",
    route: "r",
    model: None,
    model_version: None,
    policy_version: "p",
    actions: &[],
    explored: &[],
    propensities: &[],
    timestamp_ms: 0,
};

fn one_row() -> TagClaims {
    TagClaims::new(ClaimsInput {
        prediction_id: "0190f0c4-7a1e-7b3c-9d2f-3c1b2a4d5e6f",
        route: "spam",
        model: Some("spam-clf"),
        model_version: Some("7"),
        policy_version: "3f9a1c0d2b4e5f60",
        actions: &["spam"],
        timestamp_ms: 1_735_689_600_000,
        ..Default::default()
    })
}

fn explored_rows() -> TagClaims {
    TagClaims::new(ClaimsInput {
        prediction_id: "0190f0c4-7a1e-7b3c-9d2f-3c1b2a4d5e6f",
        route: "fraud",
        model: Some("fraud-gbm"),
        policy_version: "v12",
        actions: &["allow", "review", "block"],
        explored: &[false, true, false],
        propensities: &[0.95, 0.025, 0.1 + 0.2],
        timestamp_ms: 1_735_689_600_123,
        ..Default::default()
    })
}

/// A ring with an Ed25519 key `ed` and an HMAC key `hm`, and its directory.
fn ring() -> (tempfile::TempDir, KeyRing) {
    let dir = tempfile::tempdir().unwrap();
    generate_key(dir.path(), "ed", Algorithm::Ed25519).unwrap();
    generate_key(dir.path(), "hm", Algorithm::HmacSha256).unwrap();
    let ring = KeyRing::load_dir(dir.path()).unwrap();
    (dir, ring)
}

fn parts(token: &str) -> (String, String) {
    let rest = token.strip_prefix(TAG_PREFIX).unwrap();
    let (payload, sig) = rest.split_once('.').unwrap();
    (payload.to_owned(), sig.to_owned())
}

/// A token with `payload_json` as its payload and `sig` as its signature part.
fn reassemble(payload_json: &[u8], sig: &str) -> String {
    format!("{TAG_PREFIX}{}.{sig}", URL_SAFE_NO_PAD.encode(payload_json))
}

fn payload_json(token: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(parts(token).0).unwrap()
}

#[test]
fn sign_verify_round_trip_both_algorithms() {
    let (_dir, ring) = ring();
    for (key, alg) in [("ed", Algorithm::Ed25519), ("hm", Algorithm::HmacSha256)] {
        for mut claims in [one_row(), explored_rows()] {
            let token = ring.sign(key, alg, &mut claims).expect("signs");
            assert_eq!(claims.key_id, key);
            assert_eq!(claims.algorithm, alg);
            assert!(token.starts_with(TAG_PREFIX));
            assert!(token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
            assert_eq!(ring.verify(&token), Ok(claims.clone()));
            assert_eq!(decode_unverified(&token), Ok(claims));
        }
    }
}

#[test]
fn payload_is_compact_json_with_short_keys() {
    let (_dir, ring) = ring();
    let mut claims = one_row();
    claims.model_version = None;
    let token = ring.sign("ed", Algorithm::Ed25519, &mut claims).unwrap();
    let json = String::from_utf8(payload_json(&token)).unwrap();
    assert_eq!(
        json,
        r#"{"k":"ed","alg":"ed25519","id":"0190f0c4-7a1e-7b3c-9d2f-3c1b2a4d5e6f","r":"spam","m":"spam-clf","p":"3f9a1c0d2b4e5f60","n":1,"a":["spam"],"t":1735689600000}"#
    );
    let mut claims = explored_rows();
    let token = ring.sign("hm", Algorithm::HmacSha256, &mut claims).unwrap();
    let json = String::from_utf8(payload_json(&token)).unwrap();
    assert!(json.contains(r#""alg":"hs256""#), "{json}");
    assert!(
        json.contains(r#""x":"010","pr":[0.95,0.025,0.3]"#),
        "{json}"
    );
    assert!(!json.contains("null"));
}

#[test]
fn token_length_of_a_one_row_tag() {
    let (_dir, ring) = ring();
    for (key, alg) in [("ed", Algorithm::Ed25519), ("hm", Algorithm::HmacSha256)] {
        let token = ring.sign(key, alg, &mut one_row()).unwrap();
        println!("1-row {alg} tag: {} bytes: {token}", token.len());
        assert!(token.len() < 400, "{}", token.len());
    }
}

#[test]
fn propensities_survive_the_round_trip_at_six_digits() {
    let (_dir, ring) = ring();
    let mut claims = explored_rows();
    let token = ring.sign("ed", Algorithm::Ed25519, &mut claims).unwrap();
    let verified = ring.verify(&token).unwrap();
    assert_eq!(verified.propensities, vec![0.95, 0.025, 0.3]);
    assert!(verified.exploration_matches(&[false, true, false], &[0.95, 0.025, 0.1 + 0.2]));
    assert!(!verified.exploration_matches(&[false, false, false], &[0.95, 0.025, 0.3]));
    assert!(!verified.exploration_matches(&[false, true, false], &[0.95, 0.026, 0.3]));
    assert!(!verified.exploration_matches(&[], &[]));
    assert!(ring
        .verify(&ring.sign("ed", Algorithm::Ed25519, &mut one_row()).unwrap())
        .unwrap()
        .exploration_matches(&[], &[]));
}

#[test]
fn tampering_with_any_payload_byte_is_rejected() {
    let (_dir, ring) = ring();
    for (key, alg) in [("ed", Algorithm::Ed25519), ("hm", Algorithm::HmacSha256)] {
        let token = ring.sign(key, alg, &mut explored_rows()).unwrap();
        let (_, sig) = parts(&token);
        let json = payload_json(&token);
        let mut forged_as_bad_signature = 0;
        for i in 0..json.len() {
            for replacement in [json[i] ^ 0x01, json[i] ^ 0x20, b'1', b'"'] {
                if replacement == json[i] {
                    continue;
                }
                let mut tampered = json.clone();
                tampered[i] = replacement;
                let forged = reassemble(&tampered, &sig);
                let err = ring
                    .verify(&forged)
                    .expect_err("a tampered tag must not verify");
                // A tampered payload that still decodes under the same key fails on the
                // signature; one that no longer decodes is malformed; one naming another key
                // id is unknown.
                match decode_unverified(&forged) {
                    Ok(c) if c.key_id == key && c.algorithm == alg => {
                        assert_eq!(err, TagError::BadSignature, "byte {i}");
                        forged_as_bad_signature += 1;
                    }
                    Ok(c) if c.key_id != key => {
                        assert!(matches!(err, TagError::UnknownKey(_)), "{err:?}")
                    }
                    Ok(_) => assert!(matches!(err, TagError::AlgorithmMismatch { .. })),
                    Err(decode_err) => assert_eq!(err, decode_err),
                }
            }
        }
        assert!(
            forged_as_bad_signature > json.len(),
            "{forged_as_bad_signature}"
        );
        // And every character of the base64url payload, as sent.
        let (payload, sig) = parts(&token);
        for i in 0..payload.len() {
            let mut bytes = payload.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let forged = format!("{TAG_PREFIX}{}.{sig}", String::from_utf8(bytes).unwrap());
            assert!(ring.verify(&forged).is_err(), "payload char {i}");
        }
    }
}

#[test]
fn tampering_with_each_claim_is_a_bad_signature() {
    let (dir, ring) = ring();
    generate_key(dir.path(), "ed2", Algorithm::Ed25519).unwrap();
    generate_key(dir.path(), "hm2", Algorithm::HmacSha256).unwrap();
    let ring2 = KeyRing::load_dir(dir.path()).unwrap();
    type Tamper = fn(&mut TagClaims);
    let tampers: Vec<(&str, Tamper)> = vec![
        ("prediction id", |c| c.prediction_id.push('x')),
        ("route", |c| c.route = "ham".into()),
        ("model", |c| c.model = Some("other".into())),
        ("model removed", |c| c.model = None),
        ("model version", |c| c.model_version = Some("8".into())),
        ("policy", |c| c.policy_version = "v13".into()),
        ("actions", |c| {
            c.actions = Some(vec!["allow".into(), "allow".into(), "block".into()])
        }),
        ("rows", |c| {
            c.rows = 2;
            c.actions.as_mut().unwrap().pop();
            c.explored.pop();
            c.propensities.pop();
        }),
        ("explored", |c| c.explored = vec![false, false, false]),
        ("propensity", |c| c.propensities[1] = 0.5),
        ("exploration removed", |c| {
            c.explored.clear();
            c.propensities.clear();
        }),
        ("timestamp", |c| c.timestamp_ms += 1),
    ];
    for (key, other_key, alg) in [
        ("ed", "ed2", Algorithm::Ed25519),
        ("hm", "hm2", Algorithm::HmacSha256),
    ] {
        let mut claims = explored_rows();
        let token = ring.sign(key, alg, &mut claims).unwrap();
        let (_, sig) = parts(&token);
        for (what, tamper) in &tampers {
            let mut changed = claims.clone();
            tamper(&mut changed);
            assert_ne!(changed, claims, "{what}");
            let forged = reassemble(&changed.to_payload_json().unwrap(), &sig);
            assert_eq!(ring.verify(&forged), Err(TagError::BadSignature), "{what}");
        }
        // Another key id of the same kind: the signature does not match that key.
        let mut changed = claims.clone();
        changed.key_id = other_key.into();
        let forged = reassemble(&changed.to_payload_json().unwrap(), &sig);
        assert_eq!(ring2.verify(&forged), Err(TagError::BadSignature));
    }
}

#[test]
fn tampering_with_the_signature_is_rejected() {
    let (_dir, ring) = ring();
    for (key, alg) in [("ed", Algorithm::Ed25519), ("hm", Algorithm::HmacSha256)] {
        let token = ring.sign(key, alg, &mut one_row()).unwrap();
        let (payload, sig) = parts(&token);
        for i in 0..sig.len() {
            for c in [b'A', b'B', b'_', b'-'] {
                let mut bytes = sig.clone().into_bytes();
                if bytes[i] == c {
                    continue;
                }
                bytes[i] = c;
                let forged = format!(
                    "{TAG_PREFIX}{payload}.{}",
                    String::from_utf8(bytes).unwrap()
                );
                assert!(ring.verify(&forged).is_err(), "sig char {i}");
            }
        }
        let forged = format!("{TAG_PREFIX}{payload}.{sig}A");
        assert!(matches!(ring.verify(&forged), Err(TagError::Malformed(_))));
    }
}

#[test]
fn truncated_tokens_are_truncated_or_malformed() {
    let (_dir, ring) = ring();
    for (key, alg) in [("ed", Algorithm::Ed25519), ("hm", Algorithm::HmacSha256)] {
        let token = ring.sign(key, alg, &mut explored_rows()).unwrap();
        for end in 0..token.len() {
            let cut = &token[..end];
            for result in [ring.verify(cut), decode_unverified(cut)] {
                match result {
                    Err(TagError::Truncated) | Err(TagError::Malformed(_)) => {}
                    // Cut only inside the signature: the payload alone still decodes.
                    Ok(_) if cut.len() > TAG_PREFIX.len() + parts(&token).0.len() + 1 => {}
                    other => panic!("cut at {end}: {other:?}"),
                }
            }
            if end > 0 {
                assert_eq!(ring.verify(cut), Err(TagError::Truncated), "cut at {end}");
            }
        }
    }
}

#[test]
fn shape_errors_are_classified() {
    let (_dir, ring) = ring();
    assert_eq!(
        ring.verify("sg2.abc.def"),
        Err(TagError::UnsupportedVersion("sg2".into()))
    );
    assert_eq!(
        ring.verify("sg10"),
        Err(TagError::UnsupportedVersion("sg10".into()))
    );
    assert_eq!(ring.verify("sg"), Err(TagError::Truncated));
    assert!(matches!(ring.verify(""), Err(TagError::Malformed(_))));
    assert!(matches!(ring.verify("hello"), Err(TagError::Malformed(_))));
    assert!(matches!(
        ring.verify("sg1.a.b.c"),
        Err(TagError::Malformed(_))
    ));
    assert!(matches!(
        ring.verify("sg1.!!.abc"),
        Err(TagError::Malformed(_))
    ));
    let huge = format!("{TAG_PREFIX}{}.x", "A".repeat(MAX_TAG_LEN));
    assert!(matches!(ring.verify(&huge), Err(TagError::Malformed(_))));
    // A payload that is valid JSON but not a tag.
    let not_claims = reassemble(br#"{"k":"ed"}"#, "AAAA");
    assert!(matches!(
        ring.verify(&not_claims),
        Err(TagError::Malformed(_))
    ));
    // Attacker-chosen text in an error message is bounded.
    let long_alg = format!(r#"{{"k":"ed","alg":"{}"}}"#, "z".repeat(5000));
    let err = ring
        .verify(&reassemble(long_alg.as_bytes(), "AAAA"))
        .unwrap_err();
    assert!(err.to_string().len() < 300, "{err}");
    assert_eq!(err.kind(), "malformed");
}

#[test]
fn inconsistent_payloads_are_malformed_even_when_signed() {
    let (_dir, ring) = ring();
    let mut claims = one_row();
    claims.key_id = "hm".into();
    claims.algorithm = Algorithm::HmacSha256;
    let cases: Vec<fn(&mut TagClaims)> = vec![
        |c| c.rows = 2,
        |c| {
            c.actions = None;
            c.actions_digest = Some("00".repeat(32));
        },
        |c| c.explored = vec![true],
        |c| {
            c.explored = vec![true];
            c.propensities = vec![1.5];
        },
        |c| c.exploration_digest = Some("00".repeat(32)),
        |c| c.prediction_id.clear(),
    ];
    for (i, case) in cases.iter().enumerate() {
        let mut bad = claims.clone();
        case(&mut bad);
        assert!(bad.validate().is_err(), "case {i}");
        // Sign the raw payload with the key directly, as a careless signer might.
        let json = bad.to_payload_json().unwrap();
        let signed = format!("{TAG_PREFIX}{}", URL_SAFE_NO_PAD.encode(&json));
        let mut sig = String::new();
        assert!(ring
            .key("hm")
            .unwrap()
            .sign_into(signed.as_bytes(), &mut sig));
        let token = format!("{signed}.{sig}");
        assert!(
            matches!(ring.verify(&token), Err(TagError::Malformed(_))),
            "case {i}"
        );
    }
}

#[test]
fn unknown_key_id() {
    let (_dir, ring) = ring();
    let token = ring.sign("ed", Algorithm::Ed25519, &mut one_row()).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    generate_key(other_dir.path(), "someone-else", Algorithm::Ed25519).unwrap();
    let other = KeyRing::load_dir(other_dir.path()).unwrap();
    let err = other.verify(&token).unwrap_err();
    assert_eq!(err, TagError::UnknownKey("ed".into()));
    assert_eq!(err.kind(), "unknown_key");
    assert_eq!(
        KeyRing::default().verify(&token),
        Err(TagError::UnknownKey("ed".into()))
    );
}

#[test]
fn public_key_alone_verifies_but_cannot_sign() {
    let (dir, ring) = ring();
    let mut claims = one_row();
    let token = ring.sign("ed", Algorithm::Ed25519, &mut claims).unwrap();
    let audit_dir = tempfile::tempdir().unwrap();
    fs::copy(
        dir.path().join("ed.ed25519.pub"),
        audit_dir.path().join("ed.ed25519.pub"),
    )
    .unwrap();
    let audit = KeyRing::load_dir(audit_dir.path()).unwrap();
    assert_eq!(audit.verify(&token), Ok(claims));
    assert_eq!(
        audit.key_ids(),
        vec![("ed".to_owned(), Algorithm::Ed25519, false)]
    );
    assert!(!audit.can_sign("ed", Algorithm::Ed25519));
    assert_eq!(audit.sign("ed", Algorithm::Ed25519, &mut one_row()), None);
    assert!(ring.can_sign("ed", Algorithm::Ed25519));
}

#[test]
fn rotation_new_key_signs_both_verify() {
    let dir = tempfile::tempdir().unwrap();
    generate_key(dir.path(), "2025-01", Algorithm::Ed25519).unwrap();
    let before = KeyRing::load_dir(dir.path()).unwrap();
    let mut old_claims = one_row();
    let old_token = before
        .sign("2025-01", Algorithm::Ed25519, &mut old_claims)
        .unwrap();

    // The Secret gains a new key; the policy switches its signing key id to it.
    generate_key(dir.path(), "2025-02", Algorithm::Ed25519).unwrap();
    let after = KeyRing::load_dir(dir.path()).unwrap();
    let mut new_claims = one_row();
    let new_token = after
        .sign("2025-02", Algorithm::Ed25519, &mut new_claims)
        .unwrap();
    assert_eq!(after.verify(&old_token), Ok(old_claims.clone()));
    assert_eq!(after.verify(&new_token), Ok(new_claims));
    assert_eq!(
        before.verify(&new_token),
        Err(TagError::UnknownKey("2025-02".into()))
    );

    // The old key is removed once its tags are no longer verified.
    fs::remove_file(dir.path().join("2025-01.ed25519")).unwrap();
    fs::remove_file(dir.path().join("2025-01.ed25519.pub")).unwrap();
    let last = KeyRing::load_dir(dir.path()).unwrap();
    assert_eq!(
        last.verify(&old_token),
        Err(TagError::UnknownKey("2025-01".into()))
    );
    assert_eq!(before.verify(&old_token), Ok(old_claims));
}

#[test]
fn algorithm_confusion_is_never_accepted() {
    let dir = tempfile::tempdir().unwrap();
    generate_key(dir.path(), "shared", Algorithm::HmacSha256).unwrap();
    let hmac_ring = KeyRing::load_dir(dir.path()).unwrap();
    let mut claims = one_row();
    let token = hmac_ring
        .sign("shared", Algorithm::HmacSha256, &mut claims)
        .unwrap();
    let (_, sig) = parts(&token);
    let mut rewritten = claims.clone();
    rewritten.algorithm = Algorithm::Ed25519;
    let forged = reassemble(&rewritten.to_payload_json().unwrap(), &sig);
    assert_eq!(
        hmac_ring.verify(&forged),
        Err(TagError::AlgorithmMismatch {
            key: "shared".into(),
            expected: Algorithm::HmacSha256,
            found: Algorithm::Ed25519,
        })
    );

    // A ring where `shared` is an Ed25519 key: neither the original nor the rewritten tag,
    // nor one with a signature of the right length, is accepted.
    let ed_dir = tempfile::tempdir().unwrap();
    generate_key(ed_dir.path(), "shared", Algorithm::Ed25519).unwrap();
    let ed_ring = KeyRing::load_dir(ed_dir.path()).unwrap();
    assert!(matches!(
        ed_ring.verify(&token),
        Err(TagError::AlgorithmMismatch { .. })
    ));
    let padded = reassemble(
        &rewritten.to_payload_json().unwrap(),
        &format!("{sig}{sig}"),
    );
    for t in [&forged, &padded] {
        let err = ed_ring.verify(t).unwrap_err();
        assert!(
            matches!(
                err,
                TagError::BadSignature | TagError::Truncated | TagError::Malformed(_)
            ),
            "{err:?}"
        );
    }
    // Signing through the ring with the wrong algorithm is refused.
    assert_eq!(
        hmac_ring.sign("shared", Algorithm::Ed25519, &mut one_row()),
        None
    );
    assert_eq!(
        ed_ring.sign("shared", Algorithm::HmacSha256, &mut one_row()),
        None
    );
}

#[test]
fn random_input_never_panics() {
    let (_dir, ring) = ring();
    let mut rng = Seeded::new(0x9E37_79B9_7F4A_7C15);
    const ALPHABET: &[u8] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ :\"{}[],";
    for i in 0..10_000 {
        let len = rng.below(300);
        let mut bytes: Vec<u8> = (0..len)
            .map(|_| {
                if rng.below(4) == 0 {
                    rng.next() as u8
                } else {
                    ALPHABET[rng.below(ALPHABET.len())]
                }
            })
            .collect();
        // Half of them look like a tag, to get past the first check.
        if i % 2 == 0 {
            bytes.splice(0..0, TAG_PREFIX.bytes());
        }
        // Some carry a random JSON-ish payload in valid base64url, to reach the JSON parser.
        if i % 4 == 0 {
            let json: Vec<u8> = (0..rng.below(200))
                .map(|_| ALPHABET[rng.below(ALPHABET.len())])
                .collect();
            bytes = reassemble(&json, "AAAA").into_bytes();
        }
        let s = String::from_utf8_lossy(&bytes);
        assert!(ring.verify(&s).is_err());
        let _ = decode_unverified(&s);
    }
}

#[test]
fn random_mutations_of_a_valid_token_never_panic_nor_verify() {
    let (_dir, ring) = ring();
    let mut rng = Seeded::new(0xD1B5_4A32_D192_ED03);
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=";
    const JSON_CHARS: &[u8] = b"{}[]\":,0123456789.-eEtrufalsn\\ abkxdpr";
    for (key, alg) in [("ed", Algorithm::Ed25519), ("hm", Algorithm::HmacSha256)] {
        let token = ring.sign(key, alg, &mut explored_rows()).unwrap();
        for _ in 0..5_000 {
            let mut m = token.clone().into_bytes();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(m.len() + 1);
                match rng.below(6) {
                    0 if at < m.len() => m[at] = CHARS[rng.below(CHARS.len())],
                    1 if at < m.len() => {
                        m.remove(at);
                    }
                    2 => m.insert(at, CHARS[rng.below(CHARS.len())]),
                    3 => m.truncate(at),
                    4 if at < m.len() => m[at] = rng.next() as u8,
                    _ => {
                        // Mutate the decoded JSON and re-encode it, to get deep into parsing.
                        let s = String::from_utf8_lossy(&m).into_owned();
                        if let Some((p, sig)) =
                            s.strip_prefix(TAG_PREFIX).and_then(|r| r.split_once('.'))
                        {
                            if let Ok(mut json) = URL_SAFE_NO_PAD.decode(p) {
                                if !json.is_empty() {
                                    let j = rng.below(json.len());
                                    json[j] = JSON_CHARS[rng.below(JSON_CHARS.len())];
                                }
                                m = reassemble(&json, sig).into_bytes();
                            }
                        }
                    }
                }
            }
            let s = String::from_utf8_lossy(&m);
            if let Ok(claims) = ring.verify(&s) {
                assert_eq!(s, token, "a changed token verified: {claims:?}");
            }
            let _ = decode_unverified(&s);
        }
    }
}

#[test]
fn openssl_pem_keys_load_and_interoperate() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("ossl.ed25519"), OPENSSL_PRIVATE_PEM).unwrap();
    fs::write(dir.path().join("ossl.ed25519.pub"), OPENSSL_PUBLIC_PEM).unwrap();
    // CRLF line endings, as a file edited on Windows would have.
    fs::write(
        dir.path().join("crlf.ed25519"),
        OPENSSL_PRIVATE_PEM.replace('\n', "\r\n"),
    )
    .unwrap();
    let ring = KeyRing::load_dir(dir.path()).unwrap();
    assert!(ring.can_sign("ossl", Algorithm::Ed25519));

    // Ed25519 is deterministic: our signature equals OpenSSL's.
    let mut sig = String::new();
    assert!(ring.key("ossl").unwrap().sign_into(b"sg1.test", &mut sig));
    assert_eq!(
        URL_SAFE_NO_PAD.decode(sig).unwrap(),
        STANDARD.decode(OPENSSL_SIG_OF_SG1_TEST).unwrap()
    );

    // The public PEM alone verifies a tag the private PEM signed.
    let mut claims = one_row();
    let token = ring.sign("ossl", Algorithm::Ed25519, &mut claims).unwrap();
    let pub_dir = tempfile::tempdir().unwrap();
    fs::write(pub_dir.path().join("ossl.ed25519.pub"), OPENSSL_PUBLIC_PEM).unwrap();
    assert_eq!(
        KeyRing::load_dir(pub_dir.path()).unwrap().verify(&token),
        Ok(claims)
    );

    // The same key as base64 of its 32-byte seed, and the public key as base64 of 32 bytes.
    let seed: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&OPENSSL_SEED_HEX[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let raw_dir = tempfile::tempdir().unwrap();
    fs::write(
        raw_dir.path().join("ossl.ed25519"),
        format!("{}\n", STANDARD.encode(&seed)),
    )
    .unwrap();
    let spki = STANDARD
        .decode(OPENSSL_PUBLIC_PEM.lines().nth(1).unwrap())
        .unwrap();
    // The last 32 bytes of an Ed25519 SPKI are the key; wrapped over lines on purpose.
    let raw_pub = STANDARD.encode(&spki[spki.len() - 32..]);
    fs::write(
        raw_dir.path().join("ossl.ed25519.pub"),
        format!("{}\n  {}\n", &raw_pub[..20], &raw_pub[20..]),
    )
    .unwrap();
    let raw = KeyRing::load_dir(raw_dir.path()).unwrap();
    assert!(raw.verify(&token).is_ok());
    assert_eq!(
        raw.sign("ossl", Algorithm::Ed25519, &mut one_row()),
        Some(token)
    );
}

#[test]
fn generated_keys_are_openssl_style_pem_with_safe_modes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let written = generate_key(&keys, "k1", Algorithm::Ed25519).unwrap();
    assert_eq!(
        written,
        vec![keys.join("k1.ed25519"), keys.join("k1.ed25519.pub")]
    );
    let private = fs::read_to_string(&written[0]).unwrap();
    assert!(private.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    // PKCS#8 v1 without the public key: the same length as OpenSSL's.
    assert_eq!(private.len(), OPENSSL_PRIVATE_PEM.len());
    let public = fs::read_to_string(&written[1]).unwrap();
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----\n"));
    assert_eq!(public.len(), OPENSSL_PUBLIC_PEM.len());
    let written = generate_key(&keys, "h1", Algorithm::HmacSha256).unwrap();
    assert_eq!(written, vec![keys.join("h1.hmac")]);
    assert_eq!(
        STANDARD
            .decode(fs::read_to_string(&written[0]).unwrap().trim())
            .unwrap()
            .len(),
        32
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&keys.join("k1.ed25519")), 0o600);
        assert_eq!(mode(&keys.join("h1.hmac")), 0o600);
        assert_eq!(mode(&keys.join("k1.ed25519.pub")), 0o644);
        assert_eq!(mode(&keys), 0o700);
    }

    // Never overwrite, never reuse an id across kinds, never accept a bad id.
    let before = fs::read_to_string(keys.join("k1.ed25519")).unwrap();
    let err = generate_key(&keys, "k1", Algorithm::Ed25519).unwrap_err();
    assert_eq!(err.file, keys.join("k1.ed25519"));
    assert!(generate_key(&keys, "k1", Algorithm::HmacSha256).is_err());
    assert!(generate_key(&keys, "h1", Algorithm::Ed25519).is_err());
    assert_eq!(fs::read_to_string(keys.join("k1.ed25519")).unwrap(), before);
    assert!(generate_key(&keys, "bad/id", Algorithm::HmacSha256).is_err());
    assert!(generate_key(&keys, "", Algorithm::HmacSha256).is_err());
    assert!(generate_key(&keys, &"a".repeat(65), Algorithm::HmacSha256).is_err());

    let ring = KeyRing::load_dir(&keys).unwrap();
    assert_eq!(
        ring.key_ids(),
        vec![
            ("h1".to_owned(), Algorithm::HmacSha256, true),
            ("k1".to_owned(), Algorithm::Ed25519, true)
        ]
    );
    assert_eq!(ring.len(), 2);
    // Debug output never shows key material.
    let hmac_text = fs::read_to_string(keys.join("h1.hmac")).unwrap();
    let debug = format!("{ring:?}");
    assert!(!debug.contains(hmac_text.trim()), "{debug}");
}

#[test]
fn bad_key_files_are_each_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    generate_key(d, "good", Algorithm::Ed25519).unwrap();
    let other = tempfile::tempdir().unwrap();
    generate_key(other.path(), "x", Algorithm::Ed25519).unwrap();
    let other_pub = fs::read_to_string(other.path().join("x.ed25519.pub")).unwrap();
    let write = |name: &str, text: &str| fs::write(d.join(name), text).unwrap();
    write("short.hmac", &STANDARD.encode([7u8; 16]));
    write("notb64.hmac", "this is !!! not base64");
    write(
        "garbage.ed25519",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    write("pubinpriv.ed25519", OPENSSL_PUBLIC_PEM);
    write("privinpub.ed25519.pub", OPENSSL_PRIVATE_PEM);
    write("len.ed25519", &STANDARD.encode([1u8; 31]));
    write("bad id.hmac", &STANDARD.encode([7u8; 32]));
    write("dup.hmac", &STANDARD.encode([7u8; 32]));
    write("dup.ed25519.pub", OPENSSL_PUBLIC_PEM);
    write("mismatch.ed25519", OPENSSL_PRIVATE_PEM);
    write("mismatch.ed25519.pub", &other_pub);
    write("binary.hmac", "");
    fs::write(d.join("binary.hmac"), [0xff, 0xfe, 0x00, 0x80]).unwrap();
    write("huge.hmac", &"A".repeat(20_000));
    fs::create_dir(d.join("dir.hmac")).unwrap();
    // Ignored: other names, dot-files, Kubernetes' own entries.
    write("README.md", "not a key");
    write("notes.txt", "not a key");
    write(".hidden.hmac", "garbage");
    fs::create_dir(d.join("..2025_01_01_00_00_00.000")).unwrap();
    fs::write(d.join("..2025_01_01_00_00_00.000/zzz.hmac"), "garbage").unwrap();

    let errors = KeyRing::load_dir(d).unwrap_err();
    let named: Vec<String> = errors
        .iter()
        .map(|e| e.file.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for bad in [
        "short.hmac",
        "notb64.hmac",
        "garbage.ed25519",
        "pubinpriv.ed25519",
        "privinpub.ed25519.pub",
        "len.ed25519",
        "bad id.hmac",
        "dup.hmac",
        "mismatch.ed25519.pub",
        "binary.hmac",
        "huge.hmac",
        "dir.hmac",
    ] {
        assert!(
            named.iter().any(|n| n == bad),
            "{bad} not reported: {errors:#?}"
        );
    }
    assert_eq!(named.len(), 12, "{errors:#?}");
    for e in &errors {
        let text = e.to_string();
        assert!(text.starts_with(&e.file.display().to_string()), "{text}");
        println!("{text}");
    }
    let missing = KeyRing::load_dir(&d.join("nope")).unwrap_err();
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0].file, d.join("nope"));
}

#[cfg(unix)]
#[test]
fn kubernetes_secret_layout_loads() {
    // kubelet: `..data` -> `..<timestamp>/`, and each key name a link to `..data/<name>`.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stamp = d.join("..2025_06_01_12_00_00.123456789");
    fs::create_dir(&stamp).unwrap();
    generate_key(&stamp, "k7", Algorithm::Ed25519).unwrap();
    std::os::unix::fs::symlink("..2025_06_01_12_00_00.123456789", d.join("..data")).unwrap();
    for name in ["k7.ed25519", "k7.ed25519.pub"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), d.join(name)).unwrap();
    }
    let ring = KeyRing::load_dir(d).unwrap();
    assert_eq!(
        ring.key_ids(),
        vec![("k7".to_owned(), Algorithm::Ed25519, true)]
    );
}

#[test]
fn empty_directory_gives_an_empty_ring() {
    let dir = tempfile::tempdir().unwrap();
    let ring = KeyRing::load_dir(dir.path()).unwrap();
    assert!(ring.is_empty());
    assert_eq!(ring.sign("any", Algorithm::Ed25519, &mut one_row()), None);
}

#[test]
fn large_batch_uses_digests() {
    let (_dir, ring) = ring();
    let names = ["allow", "review", "block"];
    let mut rng = Seeded::new(42);
    let actions: Vec<&str> = (0..1000).map(|_| names[rng.below(3)]).collect();
    let explored: Vec<bool> = (0..1000).map(|_| rng.below(10) == 0).collect();
    let propensities: Vec<f64> = explored
        .iter()
        .map(|&x| if x { 0.1 / 3.0 } else { 0.9 + 0.1 / 3.0 })
        .collect();
    let mut claims = TagClaims::new(ClaimsInput {
        prediction_id: "id-1",
        route: "fraud",
        policy_version: "v1",
        actions: &actions,
        explored: &explored,
        propensities: &propensities,
        timestamp_ms: 1,
        ..Default::default()
    });
    assert_eq!(claims.actions, None);
    assert_eq!(claims.actions_digest, Some(digest_actions(&actions)));
    assert!(claims.explored.is_empty() && claims.propensities.is_empty());
    assert!(claims.exploration_digest.is_some());
    for (key, alg) in [("ed", Algorithm::Ed25519), ("hm", Algorithm::HmacSha256)] {
        let token = ring.sign(key, alg, &mut claims).unwrap();
        println!("1000-row {alg} tag with exploration: {} bytes", token.len());
        assert!(token.len() < 500, "{}", token.len());
        let verified = ring.verify(&token).unwrap();
        assert_eq!(verified.rows, 1000);
        assert!(verified.actions_match(&actions));
        assert!(verified.exploration_matches(&explored, &propensities));
        // Full precision or already rounded to 6 digits: the same digest.
        let rounded: Vec<f64> = propensities
            .iter()
            .map(|p| format!("{p:.5e}").parse().unwrap())
            .collect();
        assert!(verified.exploration_matches(&explored, &rounded));
        let mut changed = actions.clone();
        changed[999] = if changed[999] == "allow" {
            "block"
        } else {
            "allow"
        };
        assert!(!verified.actions_match(&changed));
        assert!(!verified.actions_match(&actions[..999]));
        let mut flipped = explored.clone();
        flipped[0] = !flipped[0];
        assert!(!verified.exploration_matches(&flipped, &propensities));
    }
    // A propensity a hair above 1 from float error rounds to 1, listed or digested.
    let over = 1.0 + 1e-12;
    let many = vec!["a"; 20];
    let mut c = TagClaims::new(ClaimsInput {
        actions: &many,
        explored: &[true; 20],
        propensities: &[over; 20],
        ..PLACEHOLDER
    });
    assert!(c.exploration_digest.is_some());
    assert!(ring.sign("ed", Algorithm::Ed25519, &mut c).is_some());
    let mut c = TagClaims::new(ClaimsInput {
        actions: &["a"],
        explored: &[true],
        propensities: &[over],
        ..PLACEHOLDER
    });
    assert_eq!(c.propensities, vec![1.0]);
    assert!(ring.sign("ed", Algorithm::Ed25519, &mut c).is_some());
    // Exactly MAX_LISTED_ROWS rows are listed; one more is digested.
    let listed = vec!["a"; MAX_LISTED_ROWS];
    let c = TagClaims::new(ClaimsInput {
        actions: &listed,
        ..PLACEHOLDER
    });
    assert!(c.actions.is_some() && c.actions_match(&listed));
    let digested = vec!["a"; MAX_LISTED_ROWS + 1];
    let c = TagClaims::new(ClaimsInput {
        actions: &digested,
        ..PLACEHOLDER
    });
    assert!(c.actions.is_none() && c.actions_match(&digested));
    assert!(!c.actions_match(&listed));
    // The digest is of the actions joined by '\n'.
    assert_eq!(digest_actions(&["a", "b"]), digest_of(b"a\nb"));
}

fn digest_of(bytes: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn sign_refuses_inconsistent_claims() {
    let (_dir, ring) = ring();
    let mut nan = explored_rows();
    nan.propensities[0] = f64::NAN;
    assert_eq!(ring.sign("ed", Algorithm::Ed25519, &mut nan), None);
    let mut lengths = TagClaims::new(ClaimsInput {
        actions: &["a", "b"],
        explored: &[true],
        propensities: &[0.5],
        ..PLACEHOLDER
    });
    assert_eq!(ring.sign("ed", Algorithm::Ed25519, &mut lengths), None);
    let big: Vec<&str> = vec!["a"; 20];
    let mut mismatched = TagClaims::new(ClaimsInput {
        actions: &big,
        explored: &[true; 19],
        propensities: &[0.5; 19],
        ..PLACEHOLDER
    });
    assert_eq!(
        ring.sign("hm", Algorithm::HmacSha256, &mut mismatched),
        None
    );
    let mut empty_id = TagClaims::new(ClaimsInput {
        prediction_id: "",
        actions: &["a"],
        ..PLACEHOLDER
    });
    assert_eq!(ring.sign("hm", Algorithm::HmacSha256, &mut empty_id), None);
    let long = "x".repeat(MAX_TAG_LEN);
    let mut too_long = TagClaims::new(ClaimsInput {
        route: &long,
        actions: &["a"],
        ..PLACEHOLDER
    });
    assert_eq!(ring.sign("hm", Algorithm::HmacSha256, &mut too_long), None);
    assert_eq!(
        ring.sign("nope", Algorithm::HmacSha256, &mut one_row()),
        None
    );
    // Zero rows is a valid (if odd) tag.
    let mut zero = TagClaims::new(ClaimsInput { ..PLACEHOLDER });
    let token = ring.sign("hm", Algorithm::HmacSha256, &mut zero).unwrap();
    assert_eq!(ring.verify(&token), Ok(zero));
}

#[test]
fn row_refs() {
    assert_eq!(row_ref("0190f0c4-7a1e", 3), "0190f0c4-7a1e:3");
    for (id, row) in [("a", 0), ("01J9ZX:weird", 12), ("x", usize::MAX)] {
        assert_eq!(parse_row_ref(&row_ref(id, row)), Some((id, row)));
    }
    for bad in [
        "",
        "x",
        ":1",
        "x:",
        "x:01",
        "x:+1",
        "x:-1",
        "x:1a",
        "x: 1",
        "x:1 ",
        "x:99999999999999999999999999",
    ] {
        assert_eq!(parse_row_ref(bad), None, "{bad}");
    }
}

#[test]
fn find_tags_is_depth_first_and_bounded() {
    let body = serde_json::json!({
        "inputs": [{"data": ["sg1.first", "plain", {"deep": [["sg1.second"]]}]}],
        "sg1.key-is-not-searched": 1,
        "meta": "sg1.third",
        "other": ["sg2.not-ours", "xsg1.no", 5, null, true],
    });
    assert_eq!(
        find_tags(&body, 10),
        vec!["sg1.first", "sg1.second", "sg1.third"]
    );
    assert_eq!(find_tags(&body, 2), vec!["sg1.first", "sg1.second"]);
    assert!(find_tags(&body, 0).is_empty());
    assert_eq!(find_tags(&serde_json::json!("sg1.a"), 5), vec!["sg1.a"]);
    // Deep nesting is walked without recursion.
    let mut deep = serde_json::json!("sg1.bottom");
    for _ in 0..10_000 {
        deep = serde_json::Value::Array(vec![deep]);
    }
    assert_eq!(find_tags(&deep, 1), vec!["sg1.bottom"]);
    // Dropping a deep Value recurses in serde_json itself; take it apart iteratively.
    let mut v = deep;
    while let serde_json::Value::Array(mut items) = v {
        v = items.pop().unwrap_or(serde_json::Value::Null);
    }
}

#[test]
fn scan_tags_finds_escaped_deep_and_non_json_tags_and_counts_them_all() {
    let body = br#"{"inputs": [{"data": ["sg1.first", "plain", {"deep": [["sg1.second"]]}]}],
        "sg1.key-is-not-searched" : 1,
        "escaped": "\u0073g1.third", "all": "\u0073\u0067\u0031\u002efourth",
        "slash": "sg1.fi\/fth", "other": ["sg2.not-ours", "xsg1.no", "\u0073g2.no", 5]}"#;
    let found = scan_tags(body, 10);
    assert_eq!(
        found.first,
        vec![
            "sg1.first",
            "sg1.second",
            "sg1.third",
            "sg1.fourth",
            "sg1.fi/fth"
        ]
    );
    assert_eq!(found.total, 5);
    let two = scan_tags(body, 2);
    assert_eq!(two.first, vec!["sg1.first", "sg1.second"]);
    assert_eq!(two.total, 5, "every tag counted, not only those kept");

    // Deeper than serde_json parses (128 levels), and cut off: still found.
    let deep = format!(
        "{}\"\\u0073g1.bottom\"{}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert!(serde_json::from_str::<serde_json::Value>(&deep).is_err());
    assert_eq!(scan_tags(deep.as_bytes(), 1).first, vec!["sg1.bottom"]);
    assert_eq!(
        scan_tags(&deep.as_bytes()[..10_020], 1).first,
        vec!["sg1.bottom"]
    );
    assert_eq!(scan_tags(b"not json: \"sg1.a.b\" ok", 1).total, 1);

    // Bad escapes and surrogates are kept visible (they fail verification as malformed).
    let odd = scan_tags(
        br#"["sg1.a\qb", "\u0073g1.\ud800x", "\u0073g1.\u12", "sg1.end\"#,
        10,
    );
    assert_eq!(odd.total, 3, "{odd:?}");
    assert!(odd.first.iter().all(|t| t.contains('\u{fffd}')), "{odd:?}");
    // An unterminated string ends the search.
    assert_eq!(scan_tags(br#"["sg1.x", "sg1.unterminated"#, 10).total, 1);

    // A tag past the length limit is cut, stays a tag, and fails as too long.
    let long = format!("[\"sg1.{}.sig\"]", "a".repeat(3 * MAX_TAG_LEN));
    let t = scan_tags(long.as_bytes(), 1);
    assert_eq!(t.first[0].len(), MAX_TAG_LEN + 1);
    assert!(matches!(
        decode_unverified(&t.first[0]),
        Err(TagError::Malformed(_))
    ));
    assert_eq!(
        scan_tags(b"{\"a\": [1, 2, \"x\"]}", 10),
        ScannedTags::default()
    );
}

#[test]
fn algorithm_names() {
    for (s, a) in [
        ("ed25519", Algorithm::Ed25519),
        ("Ed25519", Algorithm::Ed25519),
        ("hmac-sha256", Algorithm::HmacSha256),
        ("hs256", Algorithm::HmacSha256),
        ("HS256", Algorithm::HmacSha256),
    ] {
        assert_eq!(s.parse::<Algorithm>(), Ok(a));
    }
    assert!("rsa".parse::<Algorithm>().is_err());
    assert_eq!(
        serde_json::to_string(&Algorithm::Ed25519).unwrap(),
        "\"ed25519\""
    );
    assert_eq!(
        serde_json::to_string(&Algorithm::HmacSha256).unwrap(),
        "\"hs256\""
    );
    assert_eq!(
        serde_json::from_str::<Algorithm>("\"hmac-sha256\"").unwrap(),
        Algorithm::HmacSha256
    );
    assert_eq!(Algorithm::HmacSha256.to_string(), "hs256");
    let kinds: Vec<&str> = [
        TagError::Malformed(String::new()),
        TagError::Truncated,
        TagError::UnsupportedVersion(String::new()),
        TagError::UnknownKey(String::new()),
        TagError::BadSignature,
        TagError::AlgorithmMismatch {
            key: String::new(),
            expected: Algorithm::Ed25519,
            found: Algorithm::HmacSha256,
        },
    ]
    .iter()
    .map(TagError::kind)
    .collect();
    assert_eq!(
        kinds,
        [
            "malformed",
            "truncated",
            "version",
            "unknown_key",
            "forged",
            "algorithm"
        ]
    );
}

#[test]
fn claims_serialize_with_readable_names() {
    // What `sluicegate tag verify` prints.
    let json = serde_json::to_value(one_row()).unwrap();
    assert_eq!(
        json["prediction_id"],
        "0190f0c4-7a1e-7b3c-9d2f-3c1b2a4d5e6f"
    );
    assert_eq!(json["algorithm"], "ed25519");
    assert_eq!(json["actions"][0], "spam");
}

/// Cost of signing and verifying one 1-row tag. Run with
/// `cargo test --release -- --ignored --nocapture tag_cost`.
#[test]
#[ignore]
fn tag_cost() {
    use std::time::Instant;
    let (_dir, ring) = ring();
    for (key, alg) in [("ed", Algorithm::Ed25519), ("hm", Algorithm::HmacSha256)] {
        let n = 20_000u32;
        let template = one_row();
        let mut token = String::new();
        let start = Instant::now();
        for _ in 0..n {
            let mut claims = template.clone();
            token = ring
                .sign(key, alg, std::hint::black_box(&mut claims))
                .unwrap();
        }
        let sign = start.elapsed() / n;
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(ring.verify(std::hint::black_box(&token)).unwrap());
        }
        let verify = start.elapsed() / n;
        println!(
            "{alg}: sign {sign:?}/tag, verify {verify:?}/tag, {} bytes",
            token.len()
        );
        // A 1000-row batch: building the claims (digests included) and signing.
        let actions = vec!["allow"; 1000];
        let propensities = vec![0.9; 1000];
        let explored = vec![false; 1000];
        let n = 2_000u32;
        let start = Instant::now();
        for _ in 0..n {
            let mut claims = TagClaims::new(ClaimsInput {
                prediction_id: "id",
                route: "r",
                policy_version: "p",
                actions: &actions,
                explored: &explored,
                propensities: &propensities,
                ..Default::default()
            });
            std::hint::black_box(ring.sign(key, alg, &mut claims).unwrap());
        }
        println!(
            "{alg}: 1000-row batch with exploration, new + sign {:?}",
            start.elapsed() / n
        );
    }
}
