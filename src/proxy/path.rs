//! The request path as routes see it and the upstream gets it.
//!
//! Model servers decode percent-encoding before they route (uvicorn/Starlette, as MLServer and
//! KServe use, serve `/v2/models/spam%2Dfilter/infer` as `spam-filter`), so a route matched on
//! the raw text could be stepped around by encoding one character. The path is normalized once:
//! percent-encoded unreserved characters (RFC 3986 §2.3: `ALPHA DIGIT - . _ ~`) are decoded,
//! and that path is both routed and forwarded. A path that would still read differently to a
//! server that decodes further is refused rather than guessed at: one holding an encoded `/`,
//! `\`, `%`, NUL or `:` (the verb separator of `/v1/models/NAME:predict`), a `%` that starts no
//! escape, or a `.` or `..` segment (which servers and clients resolve differently).

use std::borrow::Cow;

/// Why a path is refused (the client gets 400 `ambiguous_path`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum AmbiguousPath {
    #[error("the path holds a percent-encoded {0}, which servers decode differently")]
    Encoded(&'static str),
    #[error("the path holds a '%' that starts no percent-encoding")]
    StrayPercent,
    #[error("the path holds a '.' or '..' segment")]
    DotSegment,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The normalized form of `path` (the path alone, without the query), or why it is refused.
/// Borrowed when nothing was decoded, the common case.
pub(super) fn normalize(path: &str) -> Result<Cow<'_, str>, AmbiguousPath> {
    let bytes = path.as_bytes();
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            if let Some(o) = out.as_mut() {
                o.push(b);
            }
            i += 1;
            continue;
        }
        let value = match (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (Some(h), Some(l)) => h << 4 | l,
            _ => return Err(AmbiguousPath::StrayPercent),
        };
        let refused = match value {
            b'/' => Some("'/'"),
            b'\\' => Some("'\\'"),
            b'%' => Some("'%'"),
            0 => Some("NUL"),
            b':' => Some("':'"),
            _ => None,
        };
        if let Some(what) = refused {
            return Err(AmbiguousPath::Encoded(what));
        }
        let o = out.get_or_insert_with(|| bytes[..i].to_vec());
        if is_unreserved(value) {
            o.push(value);
        } else {
            // Anything else stays encoded, as sent: decoding it would change its meaning
            // (RFC 3986 §6.2.2.2).
            o.extend_from_slice(&bytes[i..i + 3]);
        }
        i += 3;
    }
    let normalized = match out {
        // Only ASCII bytes were decoded into a valid UTF-8 string.
        Some(o) => Cow::Owned(String::from_utf8(o).expect("ASCII decoded into UTF-8")),
        None => Cow::Borrowed(path),
    };
    if normalized.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(AmbiguousPath::DotSegment);
    }
    Ok(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_are_borrowed_unchanged() {
        for p in [
            "/",
            "/v2/models/spam-filter/infer",
            "/v1/models/m:predict",
            "*",
            "/a//b/",
        ] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(q)) if q == p),
                "{p}"
            );
        }
    }

    #[test]
    fn unreserved_characters_are_decoded_in_either_case() {
        let cases = [
            (
                "/v2/models/spam%2Dfilter/infer",
                "/v2/models/spam-filter/infer",
            ),
            (
                "/v2/models/spam%2dfilter/infer",
                "/v2/models/spam-filter/infer",
            ),
            (
                "/v2/%6Dodels/%73pam-filter/infer",
                "/v2/models/spam-filter/infer",
            ),
            ("/x/%41%5a%30%39%2E%5F%7E", "/x/AZ09._~"),
            // Reserved and other characters stay encoded, exactly as sent.
            ("/x/a%20b%3Bc%2Bd%C3%A9", "/x/a%20b%3Bc%2Bd%C3%A9"),
            ("/x/%2e%2E.json", "/x/...json"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw).unwrap(), want, "{raw}");
        }
    }

    #[test]
    fn encoded_delimiters_and_escapes_are_refused() {
        for (raw, what) in [
            ("/v2/models/spam-filter%2Finfer", "'/'"),
            ("/v2/models/spam-filter%2finfer", "'/'"),
            ("/v2/models/x%5C..%5Cspam-filter/infer", "'\\'"),
            ("/v2/models/spam%252Dfilter/infer", "'%'"),
            ("/v2/models/spam-filter%00/infer", "NUL"),
            ("/v1/models/spam-filter%3Apredict", "':'"),
            ("/v1/models/spam-filter%3apredict", "':'"),
        ] {
            assert_eq!(normalize(raw), Err(AmbiguousPath::Encoded(what)), "{raw}");
        }
        for raw in ["/x/%", "/x/%2", "/x/%zz", "/x/%2-"] {
            assert_eq!(normalize(raw), Err(AmbiguousPath::StrayPercent), "{raw}");
        }
    }

    #[test]
    fn dot_segments_are_refused_also_when_encoded() {
        for raw in [
            "/v2/models/x/../spam-filter/infer",
            "/v2/models/./spam-filter/infer",
            "/v2/models/x/%2e%2e/spam-filter/infer",
            "/v2/models/x/%2E./spam-filter/infer",
            "/v2/models/%2e/spam-filter/infer",
            "/..",
            "/v2/models/spam-filter/infer/.",
        ] {
            assert_eq!(normalize(raw), Err(AmbiguousPath::DotSegment), "{raw}");
        }
    }
}
