//! Signed provenance tags: what sluicegate stamps on every decided response so that a model's
//! outputs can be recognised when they come back as inputs or as training data.
//!
//! # The tag format (`sg1`)
//!
//! A tag is one URL-safe ASCII string, carried in the `sluicegate-tag` response header:
//!
//! ```text
//! sg1.<payload>.<signature>
//! ```
//!
//! - `sg1` is the format version. A reader that meets another version reports it as unsupported.
//! - `<payload>` is base64url without padding (RFC 4648 §5) of a compact JSON object (below).
//! - `<signature>` is base64url without padding of the signature over the ASCII bytes
//!   `sg1.<payload>` — everything before the second dot, exactly as sent (as in JWS). Ed25519
//!   signatures are 64 bytes (86 characters), HMAC-SHA256 ones 32 bytes (43 characters).
//!
//! Payload fields (short keys keep the header small; absent fields are omitted, never `null`):
//!
//! | key   | meaning |
//! |-------|---------|
//! | `k`   | key id of the signing key (`[A-Za-z0-9._-]{1,64}`) |
//! | `alg` | `"ed25519"` or `"hs256"` (HMAC-SHA256); must match the key's kind |
//! | `id`  | prediction id (the `sluicegate-id` header) |
//! | `r`   | route |
//! | `m`   | model name (omitted when unknown) |
//! | `mv`  | model version (omitted when unknown) |
//! | `p`   | policy version |
//! | `n`   | number of rows |
//! | `a`   | the final action of each row, an array of strings — only when `n` ≤ 16 |
//! | `ad`  | when `n` > 16 instead of `a`: lowercase hex SHA-256 of the actions joined by `\n` |
//! | `x`   | explored flags, one character per row, `"1"` explored, `"0"` not — only when the route explores and `n` ≤ 16 |
//! | `pr`  | propensities (probability of the action taken), one number per row, same condition as `x` |
//! | `xd`  | when the route explores and `n` > 16 instead of `x`/`pr`: lowercase hex SHA-256 of one line per row, `<0 or 1> <propensity>`, lines joined by `\n`, the propensity written as Rust's `{:.5e}` (e.g. `1 5.00000e-2`) |
//! | `t`   | timestamp, unix milliseconds |
//!
//! Propensities are carried to 6 significant digits, so a tag decodes to the very numbers it was
//! signed with. A row of a batch is addressed as `ID:i` ([`row_ref`], [`parse_row_ref`]).
//! Readers ignore payload fields they do not know (fields are only ever added within `sg1`; the
//! signature covers them all). Example of a 1-row payload:
//!
//! ```text
//! {"k":"k2025","alg":"ed25519","id":"0190f0c4-7a1e-7b3c-9d2f-3c1b2a4d5e6f","r":"spam",
//!  "m":"spam-clf","mv":"7","p":"3f9a1c","n":1,"a":["spam"],"t":1735689600000}
//! ```
//!
//! # Keys
//!
//! A key directory (typically a Kubernetes Secret) holds one file per key, `<key-id>.<kind>`:
//! `<id>.ed25519` (private key: PKCS#8 PEM as written by `openssl genpkey -algorithm ed25519`, or
//! the 32-byte seed in base64), `<id>.ed25519.pub` (public key: SPKI PEM as written by
//! `openssl pkey -pubout`, or 32 bytes in base64; verifies only) and `<id>.hmac` (HMAC-SHA256
//! secret, base64, at least 32 bytes). Other files and dot-files are ignored. [`KeyRing`] is an
//! immutable value loaded by [`KeyRing::load_dir`]; rotation is adding a key with a new id,
//! switching the policy's signing key to it, and removing the old key once its tags no longer
//! need verifying.

mod keys;
mod tag;
#[cfg(test)]
mod tests;

pub use keys::{generate_key, KeyError, KeyRing};
pub use tag::{
    decode_unverified, digest_actions, Algorithm, ClaimsInput, TagClaims, TagError,
    UnknownAlgorithm,
};

/// The start of every tag: the format version and the first separator.
pub const TAG_PREFIX: &str = "sg1.";

/// The most rows whose actions (and exploration) a tag lists; above it they are digested.
pub const MAX_LISTED_ROWS: usize = 16;

/// The longest token [`KeyRing::verify`] and [`decode_unverified`] will look at, in bytes.
///
/// A tag the proxy writes stays far below it (rows above [`MAX_LISTED_ROWS`] are digested);
/// the bound keeps an untrusted client from making us decode megabytes.
pub const MAX_TAG_LEN: usize = 8 * 1024;

/// Whether `id` is a valid key id: 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn is_valid_key_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `ID:i` for row `row` of the prediction `prediction_id`.
pub fn row_ref(prediction_id: &str, row: usize) -> String {
    format!("{prediction_id}:{row}")
}

/// Splits `ID:i` into the prediction id and the row index.
///
/// The index is the text after the last colon and must be canonical decimal (no sign, no
/// leading zeros), so that each row has exactly one reference; the id must not be empty.
pub fn parse_row_ref(s: &str) -> Option<(&str, usize)> {
    let (id, index) = s.rsplit_once(':')?;
    let canonical = !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
        && (index == "0" || !index.starts_with('0'));
    if id.is_empty() || !canonical {
        return None;
    }
    Some((id, index.parse().ok()?))
}

/// Every string in `value` that starts with [`TAG_PREFIX`], depth-first in document order, at
/// most `max` of them. Object keys are not searched. Strings are returned unverified.
pub fn find_tags(value: &serde_json::Value, max: usize) -> Vec<&str> {
    use serde_json::Value;
    let mut found = Vec::new();
    // An explicit stack, not recursion: a programmatically built value may nest arbitrarily deep.
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        if found.len() >= max {
            break;
        }
        match v {
            Value::String(s) if s.starts_with(TAG_PREFIX) => found.push(s.as_str()),
            // Pushed in reverse so that the first child is visited first.
            Value::Array(items) => stack.extend(items.iter().rev()),
            Value::Object(map) => stack.extend(map.values().rev()),
            _ => {}
        }
    }
    found
}

/// The tags in a request body, found without parsing it (see [`scan_tags`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScannedTags {
    /// The first tags found, unescaped, each cut to [`MAX_TAG_LEN`]` + 1` bytes (a longer one
    /// still fails verification as too long).
    pub first: Vec<String>,
    /// How many tags the body holds in all.
    pub total: usize,
}

/// Tags among `strings`, each a whole value (a gRPC request's BYTES elements and string
/// parameters): as [`scan_tags`] counts JSON string values that are tags.
pub fn scan_tag_strings<'a>(strings: impl Iterator<Item = &'a [u8]>, keep: usize) -> ScannedTags {
    let mut out = ScannedTags::default();
    for s in strings.filter(|s| s.starts_with(TAG_PREFIX.as_bytes())) {
        out.total += 1;
        if out.first.len() < keep {
            let cut = s.len().min(MAX_TAG_LEN + 1);
            out.first
                .push(String::from_utf8_lossy(&s[..cut]).into_owned());
        }
    }
    out
}

/// Every JSON string value in `body` that starts with [`TAG_PREFIX`] once unescaped (so
/// `"\u0073g1.…"` counts), in document order, keeping the first `keep`; object keys are not
/// searched. A single pass over the bytes with no parse and no nesting limit: a body nested
/// deeper than a JSON parser accepts, or not JSON at all, hides none of its quoted tags.
pub fn scan_tags(body: &[u8], keep: usize) -> ScannedTags {
    let mut out = ScannedTags::default();
    // A tag needs `sg1.` in the clear or a `\u` escape spelling part of it.
    if !contains(body, TAG_PREFIX.as_bytes()) && !contains(body, b"\\u") {
        return out;
    }
    let mut at = 0;
    while let Some(open) = body[at..].iter().position(|&b| b == b'"') {
        let start = at + open + 1;
        let mut end = start;
        let mut escaped = false;
        loop {
            match body.get(end) {
                None => return out, // an unterminated string ends the search
                Some(b'\\') => {
                    escaped = true;
                    end += 2;
                }
                Some(b'"') => break,
                Some(_) => end += 1,
            }
        }
        at = end + 1;
        let is_key = body[at..]
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b':');
        if is_key {
            continue;
        }
        let raw = &body[start..end];
        let token = if escaped {
            // The prefix first: most escaped strings are not tags.
            Some(unescape_prefix(raw, TAG_PREFIX.len()))
                .filter(|head| head.starts_with(TAG_PREFIX))
                .map(|_| unescape_prefix(raw, MAX_TAG_LEN + 1))
        } else if raw.starts_with(TAG_PREFIX.as_bytes()) {
            let cut = raw.len().min(MAX_TAG_LEN + 1);
            Some(String::from_utf8_lossy(&raw[..cut]).into_owned())
        } else {
            None
        };
        if let Some(token) = token.filter(|t| t.starts_with(TAG_PREFIX)) {
            out.total += 1;
            if out.first.len() < keep {
                out.first.push(token);
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// Unescapes the inside of a JSON string, stopping after about `max` bytes of output. An
/// invalid escape or a lone surrogate becomes U+FFFD: a tag is ASCII, so a tag holding one is
/// still found, and fails verification as malformed.
fn unescape_prefix(raw: &[u8], max: usize) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < raw.len() && out.len() < max {
        let b = raw[i];
        if b != b'\\' {
            // Copy the run up to the next escape.
            let run = raw[i..]
                .iter()
                .position(|&c| c == b'\\')
                .map_or(raw.len(), |n| i + n);
            let run = run.min(i + (max - out.len()));
            out.push_str(&String::from_utf8_lossy(&raw[i..run]));
            i = run;
            continue;
        }
        let Some(&c) = raw.get(i + 1) else {
            out.push(char::REPLACEMENT_CHARACTER);
            break;
        };
        i += 2;
        let ch = match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => match raw.get(i..i + 4).and_then(hex4) {
                Some(unit) => {
                    i += 4;
                    let mut units = vec![unit];
                    let high = (0xd800..0xdc00).contains(&unit);
                    if high && raw.get(i..i + 2) == Some(&b"\\u"[..]) {
                        if let Some(low) = raw.get(i + 2..i + 6).and_then(hex4) {
                            if (0xdc00..0xe000).contains(&low) {
                                units.push(low);
                                i += 6;
                            }
                        }
                    }
                    char::decode_utf16(units)
                        .next()
                        .and_then(Result::ok)
                        .unwrap_or(char::REPLACEMENT_CHARACTER)
                }
                None => char::REPLACEMENT_CHARACTER,
            },
            _ => char::REPLACEMENT_CHARACTER,
        };
        out.push(ch);
    }
    out
}

fn hex4(b: &[u8]) -> Option<u16> {
    if !b.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u16::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok()
}
