//! One raw HTTP/1.1 client and one Prometheus text parser, on std alone: the integration tests'
//! admin calls and `cargo xtask e2e`'s checks and scrapes (xtask/src/e2e.rs includes this file).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub struct HttpResponse {
    pub status: u16,
    /// Names in lower case, values trimmed.
    pub headers: Vec<(String, String)>,
    /// Already de-chunked.
    pub body: Vec<u8>,
}

/// One request on a fresh connection (`connection: close`), read to the end; `headers` go after
/// `host`, `content-length` is set. An answer that is not HTTP is an `InvalidData` error.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(bad)?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_lowercase(), v.trim().to_owned()))
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body).ok_or_else(bad)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// A chunked body's data, up to the last chunk or what arrived of it; None when a chunk size
/// is not hex.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    // Bounded: every round consumes at least the size line.
    for _ in 0..100_000 {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            break;
        };
        let size = String::from_utf8_lossy(&rest[..eol]);
        let len = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).ok()?;
        rest = &rest[eol + 2..];
        if len == 0 || rest.len() < len {
            break;
        }
        out.extend_from_slice(&rest[..len]);
        rest = &rest[(len + 2).min(rest.len())..];
    }
    Some(out)
}

/// A Prometheus text exposition: every series (its name and labels as written) and its value.
#[derive(Default)]
pub struct Metrics(BTreeMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        Metrics(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (k, v) = l.rsplit_once(' ')?;
                    Some((k.to_owned(), v.parse().ok()?))
                })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The series of `name` as (labels, value); labels are `{…}` as written, or empty.
    pub fn series<'m>(&'m self, name: &'m str) -> impl Iterator<Item = (&'m str, f64)> + 'm {
        self.0.iter().filter_map(move |(k, &v)| {
            let labels = k.strip_prefix(name)?;
            (labels.is_empty() || labels.starts_with('{')).then_some((labels, v))
        })
    }

    /// The sum of every series of `name` (all label sets); 0 when there is none.
    pub fn sum(&self, name: &str) -> f64 {
        self.series(name).map(|(_, v)| v).sum()
    }

    /// The sum of the series of `name` whose labels include `label` (`key="value"`).
    pub fn sum_with(&self, name: &str, label: &str) -> f64 {
        self.series(name)
            .filter(|(labels, _)| labels.contains(label))
            .map(|(_, v)| v)
            .sum()
    }
}
