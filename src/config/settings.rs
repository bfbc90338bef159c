//! Static settings: read once at start; a change needs a restart.
//!
//! Layering, lowest to highest: built-in defaults, the settings file (`--config`), environment
//! variables and flags (clap merges those two; a flag wins over its variable).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::units::{parse_bytes, parse_duration};

/// Default of `--max-decided-response`: the same as `--max-request-body`'s, which capped
/// decided responses before it had a name of its own.
pub const DEFAULT_MAX_DECIDED_RESPONSE: u64 = 16 << 20;

/// Everything `sluicegate serve` needs that does not change while it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Data-plane listener (HTTP/1.1 and h2c).
    pub listen: SocketAddr,
    /// Admin listener: /metrics, /healthz, /readyz.
    pub admin_listen: SocketAddr,
    /// The model server, e.g. `http://127.0.0.1:8080`.
    pub upstream: Upstream,
    /// Largest request body accepted; above it the client gets 413.
    pub max_request_body_bytes: u64,
    /// Largest response a deciding route reads whole (and decodes, if compressed); a larger
    /// one streams through undecided.
    pub max_decided_response_bytes: u64,
    /// Largest record the tee writes; bodies are cut to keep a record under it.
    pub max_record_bytes: u64,
    /// How a record holds the decisions of a decided batch.
    pub record_decisions: RecordDecisions,
    /// A client that has not sent its request headers within this time is cut off.
    pub header_read_timeout: Duration,
    /// Longest wait for the next piece of a request body; past it, 408.
    pub client_body_timeout: Duration,
    /// Client connections served at once; past it, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Streams one HTTP/2 client connection may have open at once.
    pub max_concurrent_streams: u32,
    /// After SIGTERM, keep serving this long before closing the listener (lets the pod leave
    /// the Service endpoints first).
    pub drain_delay: Duration,
    /// After the listener closes, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
    /// Path of the hot policy file; `None` runs the built-in default policy.
    pub policy: Option<PathBuf>,
    /// File holding the bearer token of `/admin/*`; `None` turns the admin API off.
    pub admin_token_file: Option<PathBuf>,
    /// Admin connections served at once; past it, new ones wait in the listen backlog.
    pub admin_max_connections: usize,
    /// Largest `PUT /admin/policy` body.
    pub admin_max_body_bytes: u64,
    /// An admin connection must send its request head within this (and its body within as
    /// long again).
    pub admin_header_timeout: Duration,
    /// Directory of tag keys (`<id>.ed25519`, `<id>.ed25519.pub`, `<id>.hmac`), read again at
    /// every policy reload.
    pub tag_keys_dir: Option<PathBuf>,
    pub kafka: Option<KafkaSettings>,
    pub spool: SpoolSettings,
}

/// How to reach the model server.
#[derive(Clone, Debug, PartialEq)]
pub struct Upstream {
    /// `http://host:port`, no path.
    pub authority: http::uri::Authority,
    /// Time allowed for the upstream's response headers.
    pub timeout: Duration,
    /// Longest wait for the next piece of a response body; past it, the response is cut.
    pub body_timeout: Duration,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// HTTP version spoken to the upstream.
    pub protocol: UpstreamProtocol,
    /// Path probed for readiness (`GET`, 2xx = ready); `None` probes with a TCP connect.
    pub ready_path: Option<String>,
    /// HTTP/2 connections opened to the upstream at most, each carrying as many streams as
    /// the upstream allows.
    pub h2_max_connections: usize,
}

/// Which HTTP version sluicegate speaks to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// The client's version: HTTP/1.1 stays HTTP/1.1, HTTP/2 (gRPC) goes as h2c.
    Auto,
    Http1,
    Http2,
}

/// How a record holds a decided batch's decisions (`--record-decisions`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RecordDecisions {
    /// One object per row in `decisions` (what v1 records have always held); a record that
    /// would not fit under `--max-record` falls back to columns.
    #[default]
    Rows,
    /// `decision_columns`: about two bytes a row plus the scores, which are not repeated when
    /// the response body is recorded whole. For large batches.
    Columns,
}

/// Where the tee sends records when Kafka is configured.
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic: String,
    pub alerts_topic: String,
    /// Any librdkafka property; applied last, so it overrides sluicegate's defaults.
    pub properties: BTreeMap<String, String>,
}

/// The write-ahead spool on local disk.
#[derive(Clone, Debug, PartialEq)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    /// Bound on the total size of the segment files.
    pub max_bytes: u64,
    pub segment_bytes: u64,
    /// A power loss can lose up to this much of the newest records.
    pub fsync_interval: Duration,
    /// Records waiting in memory for the spool writer, by count.
    pub queue_records: usize,
    /// Records waiting in memory for the spool writer, by bytes of captured bodies.
    pub queue_bytes: usize,
}

pub const DEFAULT_TOPIC: &str = "sluicegate.records";
pub const DEFAULT_ALERTS_TOPIC: &str = "sluicegate.alerts";

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "0.0.0.0:8090".parse().expect("literal address"),
            admin_listen: "0.0.0.0:9901".parse().expect("literal address"),
            upstream: Upstream {
                authority: http::uri::Authority::from_static("127.0.0.1:8080"),
                timeout: Duration::from_secs(30),
                body_timeout: Duration::from_secs(60),
                connect_timeout: Duration::from_secs(2),
                protocol: UpstreamProtocol::Auto,
                ready_path: None,
                h2_max_connections: 16,
            },
            max_request_body_bytes: 16 << 20,
            max_decided_response_bytes: DEFAULT_MAX_DECIDED_RESPONSE,
            max_record_bytes: 1 << 20,
            record_decisions: RecordDecisions::Rows,
            header_read_timeout: Duration::from_secs(10),
            client_body_timeout: Duration::from_secs(15),
            max_connections: 4096,
            max_concurrent_streams: 100,
            drain_delay: Duration::ZERO,
            shutdown_grace: Duration::from_secs(20),
            policy: None,
            admin_token_file: None,
            admin_max_connections: 64,
            admin_max_body_bytes: 256 << 10,
            admin_header_timeout: Duration::from_secs(5),
            tag_keys_dir: None,
            kafka: None,
            spool: SpoolSettings {
                dir: PathBuf::from("sluicegate-spool"),
                max_bytes: 1 << 30,
                segment_bytes: 16 << 20,
                fsync_interval: Duration::from_secs(1),
                queue_records: 8192,
                // Measured: it fills only while the writer's core is taken (a noisy 2-core
                // machine at 16 KiB answers dropped records at this size already), and at the
                // 16 KiB ceiling it stays within it without drops; smaller loses records
                // where the issue asks for none.
                queue_bytes: 16 << 20,
            },
        }
    }
}

/// The settings file as written: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsFile {
    /// Data-plane listener address.
    pub listen: Option<String>,
    /// Admin listener address.
    pub admin_listen: Option<String>,
    /// Upstream model server URL.
    pub upstream: Option<String>,
    /// Upstream response-header timeout, e.g. `30s`.
    pub upstream_timeout: Option<String>,
    /// Upstream connect timeout, e.g. `2s`.
    pub upstream_connect_timeout: Option<String>,
    /// Longest pause inside an upstream response body, e.g. `60s`.
    pub upstream_body_timeout: Option<String>,
    /// `auto`, `http1` or `http2`.
    pub upstream_protocol: Option<UpstreamProtocol>,
    /// Readiness probe path on the upstream, e.g. `/v2/health/ready`.
    pub upstream_ready_path: Option<String>,
    /// HTTP/2 connections to the upstream at most.
    pub upstream_h2_max_connections: Option<usize>,
    /// Largest request body, e.g. `16MiB`.
    pub max_request_body: Option<String>,
    /// Largest response a deciding route reads whole, e.g. `16MiB`.
    pub max_decided_response: Option<String>,
    /// Largest tee record, e.g. `1MiB`.
    pub max_record: Option<String>,
    /// `rows` or `columns`.
    pub record_decisions: Option<RecordDecisions>,
    /// Header read timeout, e.g. `10s`.
    pub header_read_timeout: Option<String>,
    /// Longest pause inside a request body, e.g. `15s`.
    pub client_body_timeout: Option<String>,
    /// Client connections served at once.
    pub max_connections: Option<usize>,
    /// Streams open at once on one HTTP/2 client connection.
    pub max_concurrent_streams: Option<u32>,
    /// Delay between SIGTERM and closing the listener.
    pub drain_delay: Option<String>,
    /// Time in-flight requests get after the listener closes.
    pub shutdown_grace: Option<String>,
    /// Path of the policy file.
    pub policy: Option<PathBuf>,
    /// File with the admin API's bearer token.
    pub admin_token_file: Option<PathBuf>,
    /// Admin connections served at once.
    pub admin_max_connections: Option<usize>,
    /// Largest admin request body, e.g. `256KiB`.
    pub admin_max_body: Option<String>,
    /// Admin request head (and body) timeout, e.g. `5s`.
    pub admin_header_timeout: Option<String>,
    /// Directory of provenance tag keys.
    pub tag_keys_dir: Option<PathBuf>,
    /// Kafka connection.
    pub kafka: Option<KafkaFile>,
    /// Disk spool.
    pub spool: Option<SpoolFile>,
}

/// `kafka:` in the settings file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaFile {
    /// Bootstrap brokers, comma-separated.
    pub brokers: Option<String>,
    /// Topic for request records.
    pub topic: Option<String>,
    /// Topic for limit alerts.
    pub alerts_topic: Option<String>,
    /// librdkafka properties passed through.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// `spool:` in the settings file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolFile {
    /// Spool directory.
    pub dir: Option<PathBuf>,
    /// Bound on total spool size, e.g. `1GiB`.
    pub max_bytes: Option<String>,
    /// Size at which a segment is closed, e.g. `16MiB`.
    pub segment_bytes: Option<String>,
    /// fsync interval, e.g. `1s`.
    pub fsync_interval: Option<String>,
    /// In-memory queue in front of the spool, in records.
    pub queue_records: Option<usize>,
    /// In-memory queue in front of the spool, in bytes, e.g. `64MiB`.
    pub queue_bytes: Option<String>,
}

/// Overrides from flags and environment variables (clap fills these).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SettingsArgs {
    /// Settings file (YAML).
    #[arg(long, env = "SLUICEGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data-plane listen address [default: 0.0.0.0:8090].
    #[arg(long, env = "SLUICEGATE_LISTEN")]
    pub listen: Option<String>,
    /// Admin listen address [default: 0.0.0.0:9901].
    #[arg(long, env = "SLUICEGATE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Upstream model server, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "SLUICEGATE_UPSTREAM")]
    pub upstream: Option<String>,
    /// Upstream response-header timeout [default: 30s].
    #[arg(long, env = "SLUICEGATE_UPSTREAM_TIMEOUT")]
    pub upstream_timeout: Option<String>,
    /// Upstream connect timeout [default: 2s].
    #[arg(long, env = "SLUICEGATE_UPSTREAM_CONNECT_TIMEOUT")]
    pub upstream_connect_timeout: Option<String>,
    /// Longest pause inside an upstream response body before it is cut [default: 60s].
    #[arg(long, env = "SLUICEGATE_UPSTREAM_BODY_TIMEOUT")]
    pub upstream_body_timeout: Option<String>,
    /// HTTP version to the upstream [default: auto].
    #[arg(long, env = "SLUICEGATE_UPSTREAM_PROTOCOL", value_enum)]
    pub upstream_protocol: Option<UpstreamProtocol>,
    /// Readiness probe path on the upstream (default: TCP connect).
    #[arg(long, env = "SLUICEGATE_UPSTREAM_READY_PATH")]
    pub upstream_ready_path: Option<String>,
    /// HTTP/2 connections to the upstream at most [default: 16].
    #[arg(long, env = "SLUICEGATE_UPSTREAM_H2_MAX_CONNECTIONS")]
    pub upstream_h2_max_connections: Option<usize>,
    /// Largest request body accepted [default: 16MiB].
    #[arg(long, env = "SLUICEGATE_MAX_REQUEST_BODY")]
    pub max_request_body: Option<String>,
    /// Largest response a deciding route reads whole and decides; a larger one passes
    /// undecided [default: 16MiB].
    #[arg(long, env = "SLUICEGATE_MAX_DECIDED_RESPONSE")]
    pub max_decided_response: Option<String>,
    /// Largest tee record [default: 1MiB].
    #[arg(long, env = "SLUICEGATE_MAX_RECORD")]
    pub max_record: Option<String>,
    /// How records hold a decided batch's decisions: `rows`, one object per row, or `columns`,
    /// compact, for large batches [default: rows].
    #[arg(long, env = "SLUICEGATE_RECORD_DECISIONS", value_enum)]
    pub record_decisions: Option<RecordDecisions>,
    /// Header read timeout [default: 10s].
    #[arg(long, env = "SLUICEGATE_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Option<String>,
    /// Longest pause inside a request body before 408 [default: 15s].
    #[arg(long, env = "SLUICEGATE_CLIENT_BODY_TIMEOUT")]
    pub client_body_timeout: Option<String>,
    /// Client connections served at once [default: 4096].
    #[arg(long, env = "SLUICEGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Streams open at once on one HTTP/2 client connection [default: 100].
    #[arg(long, env = "SLUICEGATE_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Delay between SIGTERM and closing the listener [default: 0s].
    #[arg(long, env = "SLUICEGATE_DRAIN_DELAY")]
    pub drain_delay: Option<String>,
    /// Time in-flight requests get to finish at shutdown [default: 20s].
    #[arg(long, env = "SLUICEGATE_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// Policy file (hot-reloaded).
    #[arg(long, env = "SLUICEGATE_POLICY")]
    pub policy: Option<PathBuf>,
    /// File with the bearer token for /admin/* (unset: the admin API is off).
    #[arg(long, env = "SLUICEGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Admin connections served at once [default: 64].
    #[arg(long, env = "SLUICEGATE_ADMIN_MAX_CONNECTIONS")]
    pub admin_max_connections: Option<usize>,
    /// Largest PUT /admin/policy body [default: 256KiB].
    #[arg(long, env = "SLUICEGATE_ADMIN_MAX_BODY")]
    pub admin_max_body: Option<String>,
    /// Time an admin connection gets to send its request head, and as long again for its body [default: 5s].
    #[arg(long, env = "SLUICEGATE_ADMIN_HEADER_TIMEOUT")]
    pub admin_header_timeout: Option<String>,
    /// Directory of provenance tag keys, one file per key (a Secret mounted as a directory).
    #[arg(long, env = "SLUICEGATE_TAG_KEYS_DIR")]
    pub tag_keys_dir: Option<PathBuf>,
    /// Kafka bootstrap brokers; unset, the spool is the sink.
    #[arg(long, env = "SLUICEGATE_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Kafka topic for records [default: sluicegate.records].
    #[arg(long, env = "SLUICEGATE_KAFKA_TOPIC")]
    pub kafka_topic: Option<String>,
    /// Kafka topic for limit alerts [default: sluicegate.alerts].
    #[arg(long, env = "SLUICEGATE_KAFKA_ALERTS_TOPIC")]
    pub kafka_alerts_topic: Option<String>,
    /// A librdkafka property KEY=VALUE (repeatable; env: comma-separated).
    #[arg(
        long = "kafka-property",
        env = "SLUICEGATE_KAFKA_PROPERTIES",
        value_delimiter = ','
    )]
    pub kafka_properties: Vec<String>,
    /// Spool directory [default: ./sluicegate-spool].
    #[arg(long, env = "SLUICEGATE_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Bound on total spool size [default: 1GiB].
    #[arg(long, env = "SLUICEGATE_SPOOL_MAX_BYTES")]
    pub spool_max_bytes: Option<String>,
    /// Spool segment size [default: 16MiB].
    #[arg(long, env = "SLUICEGATE_SPOOL_SEGMENT_BYTES")]
    pub spool_segment_bytes: Option<String>,
    /// Spool fsync interval [default: 1s].
    #[arg(long, env = "SLUICEGATE_SPOOL_FSYNC_INTERVAL")]
    pub spool_fsync_interval: Option<String>,
}

/// A settings problem, named precisely enough to fix.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("settings file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid settings:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

impl SettingsArgs {
    /// Builds the settings: defaults, then the file, then flags and environment.
    pub fn resolve(&self) -> Result<Settings, SettingsError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => SettingsFile::default(),
        };
        let mut errors = Vec::new();
        let settings = self.merge(file, &mut errors);
        if errors.is_empty() {
            Ok(settings)
        } else {
            Err(SettingsError::Invalid(errors))
        }
    }

    fn merge(&self, file: SettingsFile, errors: &mut Vec<String>) -> Settings {
        let mut s = Settings::default();
        // Each key: the flag (or its variable) if set, else the file's value, else the default.
        let pick = |flag: &Option<String>, file: Option<String>| flag.clone().or(file);
        if let Some(v) = pick(&self.listen, file.listen) {
            set_parsed(&mut s.listen, "listen", &v, |v| v.parse().ok(), errors);
        }
        if let Some(v) = pick(&self.admin_listen, file.admin_listen) {
            set_parsed(
                &mut s.admin_listen,
                "admin_listen",
                &v,
                |v| v.parse().ok(),
                errors,
            );
        }
        if let Some(v) = pick(&self.upstream, file.upstream) {
            match parse_upstream(&v) {
                Ok(a) => s.upstream.authority = a,
                Err(e) => errors.push(format!("upstream: {e}")),
            }
        }
        let durations: [(&str, &Option<String>, Option<String>, &mut Duration); 8] = [
            (
                "upstream_timeout",
                &self.upstream_timeout,
                file.upstream_timeout,
                &mut s.upstream.timeout,
            ),
            (
                "upstream_connect_timeout",
                &self.upstream_connect_timeout,
                file.upstream_connect_timeout,
                &mut s.upstream.connect_timeout,
            ),
            (
                "upstream_body_timeout",
                &self.upstream_body_timeout,
                file.upstream_body_timeout,
                &mut s.upstream.body_timeout,
            ),
            (
                "header_read_timeout",
                &self.header_read_timeout,
                file.header_read_timeout,
                &mut s.header_read_timeout,
            ),
            (
                "admin_header_timeout",
                &self.admin_header_timeout,
                file.admin_header_timeout,
                &mut s.admin_header_timeout,
            ),
            (
                "client_body_timeout",
                &self.client_body_timeout,
                file.client_body_timeout,
                &mut s.client_body_timeout,
            ),
            (
                "drain_delay",
                &self.drain_delay,
                file.drain_delay,
                &mut s.drain_delay,
            ),
            (
                "shutdown_grace",
                &self.shutdown_grace,
                file.shutdown_grace,
                &mut s.shutdown_grace,
            ),
        ];
        for (key, flag, from_file, slot) in durations {
            if let Some(v) = pick(flag, from_file) {
                set_parsed(slot, key, &v, parse_duration, errors);
            }
        }
        for (key, timeout) in [
            ("client_body_timeout", s.client_body_timeout),
            ("upstream_body_timeout", s.upstream.body_timeout),
            ("admin_header_timeout", s.admin_header_timeout),
        ] {
            if timeout.is_zero() {
                errors.push(format!("{key}: must be more than 0s"));
            }
        }
        if let Some(n) = self.max_connections.or(file.max_connections) {
            if n == 0 {
                errors.push("max_connections: must be at least 1".into());
            }
            s.max_connections = n;
        }
        if let Some(n) = self.admin_max_connections.or(file.admin_max_connections) {
            if n == 0 {
                errors.push("admin_max_connections: must be at least 1".into());
            }
            s.admin_max_connections = n;
        }
        if let Some(v) = pick(&self.admin_max_body, file.admin_max_body) {
            set_parsed(
                &mut s.admin_max_body_bytes,
                "admin_max_body",
                &v,
                parse_bytes,
                errors,
            );
        }
        if let Some(n) = self.max_concurrent_streams.or(file.max_concurrent_streams) {
            if n == 0 {
                errors.push("max_concurrent_streams: must be at least 1".into());
            }
            s.max_concurrent_streams = n;
        }
        if let Some(n) = self
            .upstream_h2_max_connections
            .or(file.upstream_h2_max_connections)
        {
            if n == 0 {
                errors.push("upstream_h2_max_connections: must be at least 1".into());
            }
            s.upstream.h2_max_connections = n;
        }
        if let Some(p) = self.upstream_protocol.or(file.upstream_protocol) {
            s.upstream.protocol = p;
        }
        s.upstream.ready_path = pick(&self.upstream_ready_path, file.upstream_ready_path);
        if let Some(p) = &s.upstream.ready_path {
            if !p.starts_with('/') {
                errors.push(format!("upstream_ready_path: {p:?} must start with '/'"));
            }
        }
        if let Some(v) = pick(&self.max_request_body, file.max_request_body) {
            set_parsed(
                &mut s.max_request_body_bytes,
                "max_request_body",
                &v,
                parse_bytes,
                errors,
            );
        }
        if let Some(v) = pick(&self.max_decided_response, file.max_decided_response) {
            set_parsed(
                &mut s.max_decided_response_bytes,
                "max_decided_response",
                &v,
                parse_bytes,
                errors,
            );
            // Zero would leave every deciding route undecided, silently.
            if s.max_decided_response_bytes == 0 {
                errors.push("max_decided_response: must be at least 1 byte".into());
            }
        }
        if let Some(v) = pick(&self.max_record, file.max_record) {
            set_parsed(
                &mut s.max_record_bytes,
                "max_record",
                &v,
                parse_bytes,
                errors,
            );
        }
        if let Some(form) = self.record_decisions.or(file.record_decisions) {
            s.record_decisions = form;
        }
        if s.max_record_bytes < 4096 {
            errors.push("max_record: must be at least 4KiB".into());
        }
        s.policy = self.policy.clone().or(file.policy);
        s.admin_token_file = self.admin_token_file.clone().or(file.admin_token_file);
        s.tag_keys_dir = self.tag_keys_dir.clone().or(file.tag_keys_dir);

        let spool = file.spool.unwrap_or_default();
        if let Some(d) = self.spool_dir.clone().or(spool.dir) {
            s.spool.dir = d;
        }
        let sizes: [(&str, &Option<String>, Option<String>, &mut u64); 2] = [
            (
                "spool.max_bytes",
                &self.spool_max_bytes,
                spool.max_bytes,
                &mut s.spool.max_bytes,
            ),
            (
                "spool.segment_bytes",
                &self.spool_segment_bytes,
                spool.segment_bytes,
                &mut s.spool.segment_bytes,
            ),
        ];
        for (key, flag, from_file, slot) in sizes {
            if let Some(v) = pick(flag, from_file) {
                set_parsed(slot, key, &v, parse_bytes, errors);
            }
        }
        if let Some(v) = pick(&self.spool_fsync_interval, spool.fsync_interval) {
            set_parsed(
                &mut s.spool.fsync_interval,
                "spool.fsync_interval",
                &v,
                parse_duration,
                errors,
            );
        }
        if let Some(n) = spool.queue_records {
            s.spool.queue_records = n;
        }
        if let Some(v) = spool.queue_bytes {
            let mut b = s.spool.queue_bytes as u64;
            set_parsed(&mut b, "spool.queue_bytes", &v, parse_bytes, errors);
            s.spool.queue_bytes = usize::try_from(b).unwrap_or(usize::MAX);
        }
        if s.spool.queue_records == 0 {
            errors.push("spool.queue_records: must be at least 1".into());
        }
        if s.spool.segment_bytes < s.max_record_bytes {
            errors.push(format!(
                "spool.segment_bytes: {} is below max_record ({}); a segment must hold a record",
                s.spool.segment_bytes, s.max_record_bytes
            ));
        }
        if s.spool.max_bytes < 2 * s.spool.segment_bytes {
            errors.push(format!(
                "spool.max_bytes: {} must be at least two segments ({})",
                s.spool.max_bytes,
                2 * s.spool.segment_bytes
            ));
        }

        let kafka = file.kafka.unwrap_or_default();
        let mut properties = kafka.properties;
        for kv in &self.kafka_properties {
            match kv.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    properties.insert(k.trim().to_string(), v.trim().to_string());
                }
                _ => errors.push(format!("kafka-property: {kv:?} is not KEY=VALUE")),
            }
        }
        let brokers = self.kafka_brokers.clone().or(kafka.brokers);
        s.kafka = match brokers.filter(|b| !b.trim().is_empty()) {
            Some(brokers) => Some(KafkaSettings {
                brokers,
                topic: pick(&self.kafka_topic, kafka.topic).unwrap_or(DEFAULT_TOPIC.into()),
                alerts_topic: pick(&self.kafka_alerts_topic, kafka.alerts_topic)
                    .unwrap_or(DEFAULT_ALERTS_TOPIC.into()),
                properties,
            }),
            None => {
                if !properties.is_empty() {
                    errors.push("kafka properties are set but no kafka brokers".into());
                }
                None
            }
        };
        s
    }
}

fn read_file(path: &Path) -> Result<SettingsFile, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(SettingsFile::default());
    }
    serde_yaml_ng::from_str(&text).map_err(|e| SettingsError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn set_parsed<T>(
    slot: &mut T,
    key: &str,
    value: &str,
    parse: impl Fn(&str) -> Option<T>,
    errors: &mut Vec<String>,
) {
    match parse(value) {
        Some(v) => *slot = v,
        None => errors.push(format!("{key}: cannot parse {value:?}")),
    }
}

/// Accepts `http://host:port` (a trailing `/` is fine); anything else is an error with a reason.
pub fn parse_upstream(value: &str) -> Result<http::uri::Authority, String> {
    let uri: http::Uri = value
        .parse()
        .map_err(|e| format!("{value:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "{value:?}: scheme {other:?} is not supported (use http://; the model server is in the same pod)"
            ))
        }
        None => return Err(format!("{value:?}: expected http://host:port")),
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{value:?}: must not have a path"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{value:?}: no host"))?;
    if authority.port_u16().is_none() {
        // Explicit beats surprising: a model server's port is never 80 by convention.
        let with_port = format!("{}:80", authority.as_str());
        return with_port.parse().map_err(|e| format!("{value:?}: {e}"));
    }
    Ok(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(f: impl FnOnce(&mut SettingsArgs)) -> SettingsArgs {
        let mut a = SettingsArgs::default();
        f(&mut a);
        a
    }

    #[test]
    fn defaults_apply_with_only_an_upstream() {
        let s = args(|a| a.upstream = Some("http://127.0.0.1:8080".into()))
            .resolve()
            .unwrap();
        assert_eq!(s.listen.port(), 8090);
        assert_eq!(s.admin_listen.port(), 9901);
        assert!(s.kafka.is_none());
    }

    #[test]
    fn flags_override_the_file_and_errors_are_all_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.yaml");
        std::fs::write(
            &path,
            "listen: 127.0.0.1:1\nupstream: http://m:9000\nkafka:\n  brokers: k:9092\n  properties: {linger.ms: '7'}\n",
        )
        .unwrap();
        let s = args(|a| {
            a.config = Some(path.clone());
            a.listen = Some("127.0.0.1:2".into());
            a.kafka_properties = vec!["acks=1".into()];
        })
        .resolve()
        .unwrap();
        assert_eq!(s.listen.port(), 2);
        assert_eq!(s.upstream.authority.as_str(), "m:9000");
        let k = s.kafka.unwrap();
        assert_eq!(k.properties["linger.ms"], "7");
        assert_eq!(k.properties["acks"], "1");

        let err = args(|a| {
            a.listen = Some("nope".into());
            a.upstream = Some("https://x:1".into());
            a.header_read_timeout = Some("ten".into());
        })
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("listen"), "{err}");
        assert!(err.contains("upstream"), "{err}");
        assert!(err.contains("header_read_timeout"), "{err}");
    }

    #[test]
    fn stream_and_body_timeout_settings_load_and_zero_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.yaml");
        std::fs::write(
            &path,
            "max_concurrent_streams: 50\nupstream_h2_max_connections: 4\nclient_body_timeout: 2s\nupstream_body_timeout: 3s\n",
        )
        .unwrap();
        let s = args(|a| a.config = Some(path.clone())).resolve().unwrap();
        assert_eq!(s.max_concurrent_streams, 50);
        assert_eq!(s.upstream.h2_max_connections, 4);
        assert_eq!(s.client_body_timeout, Duration::from_secs(2));
        assert_eq!(s.upstream.body_timeout, Duration::from_secs(3));

        let err = args(|a| {
            a.max_concurrent_streams = Some(0);
            a.upstream_h2_max_connections = Some(0);
            a.client_body_timeout = Some("0s".into());
            a.upstream_body_timeout = Some("0s".into());
        })
        .resolve()
        .unwrap_err()
        .to_string();
        for key in [
            "max_concurrent_streams",
            "upstream_h2_max_connections",
            "client_body_timeout",
            "upstream_body_timeout",
        ] {
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn the_decided_response_cap_loads_apart_from_the_request_body_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.yaml");
        std::fs::write(&path, "max_decided_response: 2MiB\n").unwrap();
        let s = args(|a| a.config = Some(path.clone())).resolve().unwrap();
        assert_eq!(s.max_decided_response_bytes, 2 << 20);
        assert_eq!(s.max_request_body_bytes, 16 << 20, "untouched");
        let s = args(|a| {
            a.config = Some(path.clone());
            a.max_decided_response = Some("64KiB".into());
        })
        .resolve()
        .unwrap();
        assert_eq!(s.max_decided_response_bytes, 64 << 10, "the flag wins");
        let s = args(|a| a.max_request_body = Some("1MiB".into()))
            .resolve()
            .unwrap();
        assert_eq!(s.max_decided_response_bytes, 16 << 20, "not tied to it");

        for bad in ["0", "lots"] {
            let err = args(|a| a.max_decided_response = Some(bad.into()))
                .resolve()
                .unwrap_err()
                .to_string();
            assert!(err.contains("max_decided_response"), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.yaml");
        std::fs::write(&path, "listn: 1\n").unwrap();
        let err = args(|a| a.config = Some(path.clone()))
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("listn"), "{err}");
    }
}
