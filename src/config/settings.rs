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
    /// A second listener for the model server's gRPC port; `None` (the default) opens none.
    pub grpc: Option<GrpcPort>,
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
    /// Redis for `scope: fleet` limits; `None`: they count per pod (degraded).
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so two deployments never share a cap.
    pub redis_key_prefix: String,
    /// File holding the Redis password (AUTH/ACL), read at start.
    pub redis_password_file: Option<PathBuf>,
    /// PEM file of the CA that signed a `rediss://` server's certificate (unset: system roots).
    pub redis_ca_file: Option<PathBuf>,
    /// PEM certificate and key for a `rediss://` server that authenticates clients.
    pub redis_client_cert: Option<(PathBuf, PathBuf)>,
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

/// The gRPC listener and the model server's gRPC port behind it. It shares the policy, the tee,
/// the metrics, the admin port and the data port's listener limits; its upstream shares the
/// data port's timeouts and always speaks HTTP/2.
#[derive(Clone, Debug, PartialEq)]
pub struct GrpcPort {
    pub listen: SocketAddr,
    pub upstream: Upstream,
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
            grpc: None,
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
            redis_url: None,
            redis_key_prefix: "sluicegate".into(),
            redis_password_file: None,
            redis_ca_file: None,
            redis_client_cert: None,
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

/// Declares one layer of settings (flags and environment, or the file: the same struct) and its
/// [`Layer::over`], so that each setting is written once.
macro_rules! layer {
    ($(#[$meta:meta])* pub struct $name:ident {
        $($(#[$field_meta:meta])* pub $field:ident: $ty:ty,)*
    }) => {
        $(#[$meta])*
        pub struct $name {
            $($(#[$field_meta])* pub $field: $ty,)*
        }
        impl Layer for $name {
            fn over(self, lower: Self) -> Self {
                $name { $($field: self.$field.over(lower.$field),)* }
            }
        }
    };
}

/// A setting as one layer gives it: what this layer leaves unset, `lower` supplies.
trait Layer {
    fn over(self, lower: Self) -> Self;
}

impl<T> Layer for Option<T> {
    fn over(self, lower: Self) -> Self {
        self.or(lower)
    }
}

/// A list given at a layer replaces the lower one whole (each list has one source today).
impl<T> Layer for Vec<T> {
    fn over(self, lower: Self) -> Self {
        if self.is_empty() {
            lower
        } else {
            self
        }
    }
}

impl<K, V> Layer for BTreeMap<K, V> {
    fn over(self, lower: Self) -> Self {
        if self.is_empty() {
            lower
        } else {
            self
        }
    }
}

layer! {
    /// Every setting as flags and environment variables give it (clap fills these) and as the
    /// settings file writes it (serde): every key optional, unknown keys refused.
    #[derive(Clone, Debug, Default, clap::Args, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SettingsArgs {
        /// Settings file (YAML).
        #[arg(long, env = "SLUICEGATE_CONFIG")]
        #[serde(skip)]
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
        /// gRPC listen address, e.g. 0.0.0.0:8091 (unset: no gRPC port; needs --grpc-upstream).
        #[arg(long, env = "SLUICEGATE_GRPC_LISTEN")]
        pub grpc_listen: Option<String>,
        /// The model server's gRPC port, e.g. http://127.0.0.1:8081 (needs --grpc-listen).
        #[arg(long, env = "SLUICEGATE_GRPC_UPSTREAM")]
        pub grpc_upstream: Option<String>,
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
        /// Redis for `scope: fleet` limits, e.g. redis://10.0.0.5:6379/0 (unset: they count per pod).
        #[arg(long, env = "SLUICEGATE_REDIS_URL")]
        pub redis_url: Option<String>,
        /// Prefix of the fleet limits' Redis keys, e.g. NAMESPACE/DEPLOYMENT [default: sluicegate].
        #[arg(long, env = "SLUICEGATE_REDIS_KEY_PREFIX")]
        pub redis_key_prefix: Option<String>,
        /// File with the Redis password (AUTH/ACL user from the URL).
        #[arg(long, env = "SLUICEGATE_REDIS_PASSWORD_FILE")]
        pub redis_password_file: Option<PathBuf>,
        /// PEM file of the CA that signed a rediss:// server's certificate [default: system roots].
        #[arg(long, env = "SLUICEGATE_REDIS_CA_FILE")]
        pub redis_ca_file: Option<PathBuf>,
        /// PEM client certificate for a rediss:// server that authenticates clients (with --redis-client-key-file).
        #[arg(long, env = "SLUICEGATE_REDIS_CLIENT_CERT_FILE")]
        pub redis_client_cert_file: Option<PathBuf>,
        /// PEM private key of --redis-client-cert-file.
        #[arg(long, env = "SLUICEGATE_REDIS_CLIENT_KEY_FILE")]
        pub redis_client_key_file: Option<PathBuf>,
        /// `kafka:` in the file, `--kafka-*` as flags.
        #[command(flatten)]
        #[serde(default, deserialize_with = "null_as_default")]
        pub kafka: KafkaArgs,
        /// `spool:` in the file, `--spool-*` as flags.
        #[command(flatten)]
        #[serde(default, deserialize_with = "null_as_default")]
        pub spool: SpoolArgs,
    }
}

layer! {
    /// The Kafka settings: `kafka.KEY` in the file, `--kafka-KEY` as a flag.
    #[derive(Clone, Debug, Default, clap::Args, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct KafkaArgs {
        /// Kafka bootstrap brokers; unset, the spool is the sink.
        #[arg(long = "kafka-brokers", value_name = "KAFKA_BROKERS", env = "SLUICEGATE_KAFKA_BROKERS")]
        pub brokers: Option<String>,
        /// Kafka topic for records [default: sluicegate.records].
        #[arg(long = "kafka-topic", value_name = "KAFKA_TOPIC", env = "SLUICEGATE_KAFKA_TOPIC")]
        pub topic: Option<String>,
        /// Kafka topic for limit alerts [default: sluicegate.alerts].
        #[arg(
            long = "kafka-alerts-topic",
            value_name = "KAFKA_ALERTS_TOPIC",
            env = "SLUICEGATE_KAFKA_ALERTS_TOPIC"
        )]
        pub alerts_topic: Option<String>,
        /// librdkafka properties as the file writes them (a map).
        #[arg(skip)]
        #[serde(default)]
        pub properties: BTreeMap<String, String>,
        /// A librdkafka property KEY=VALUE (repeatable; env: comma-separated).
        #[arg(
            long = "kafka-property",
            value_name = "KAFKA_PROPERTIES",
            env = "SLUICEGATE_KAFKA_PROPERTIES",
            value_delimiter = ','
        )]
        #[serde(skip)]
        pub property_args: Vec<String>,
    }
}

layer! {
    /// The spool settings: `spool.KEY` in the file, `--spool-KEY` as a flag (the queue's bounds
    /// are in the file only).
    #[derive(Clone, Debug, Default, clap::Args, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SpoolArgs {
        /// Spool directory [default: ./sluicegate-spool].
        #[arg(long = "spool-dir", value_name = "SPOOL_DIR", env = "SLUICEGATE_SPOOL_DIR")]
        pub dir: Option<PathBuf>,
        /// Bound on total spool size [default: 1GiB].
        #[arg(
            long = "spool-max-bytes",
            value_name = "SPOOL_MAX_BYTES",
            env = "SLUICEGATE_SPOOL_MAX_BYTES"
        )]
        pub max_bytes: Option<String>,
        /// Spool segment size [default: 16MiB].
        #[arg(
            long = "spool-segment-bytes",
            value_name = "SPOOL_SEGMENT_BYTES",
            env = "SLUICEGATE_SPOOL_SEGMENT_BYTES"
        )]
        pub segment_bytes: Option<String>,
        /// Spool fsync interval [default: 1s].
        #[arg(
            long = "spool-fsync-interval",
            value_name = "SPOOL_FSYNC_INTERVAL",
            env = "SLUICEGATE_SPOOL_FSYNC_INTERVAL"
        )]
        pub fsync_interval: Option<String>,
        /// In-memory queue in front of the spool, in records.
        #[arg(skip)]
        pub queue_records: Option<usize>,
        /// In-memory queue in front of the spool, in bytes, e.g. `64MiB`.
        #[arg(skip)]
        pub queue_bytes: Option<String>,
    }
}

/// `kafka:` or `spool:` written with nothing after it reads as an empty section.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
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

/// A setting's value with its key (the file's name for it, which errors use):
/// `key!(self.listen)`, `key!(spool: self.max_bytes)` for `spool.max_bytes`.
macro_rules! key {
    ($layer:ident . $field:ident) => {
        (stringify!($field), $layer.$field)
    };
    ($section:ident : $layer:ident . $field:ident) => {
        (
            concat!(stringify!($section), ".", stringify!($field)),
            $layer.$field,
        )
    };
}

impl SettingsArgs {
    /// Builds the settings: each key from its flag, else its variable (clap has merged those
    /// two), else the file, else the default.
    pub fn resolve(&self) -> Result<Settings, SettingsError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => SettingsArgs::default(),
        };
        let mut problems = Problems(Vec::new());
        let settings = self.clone().over(file).settings(&mut problems);
        if problems.0.is_empty() {
            Ok(settings)
        } else {
            Err(SettingsError::Invalid(problems.0))
        }
    }

    /// Parses and checks the merged layers over the defaults.
    fn settings(self, p: &mut Problems) -> Settings {
        let mut s = Settings::default();
        let addr = |v: &str| v.parse().ok();
        p.parse(&mut s.listen, key!(self.listen), addr);
        p.parse(&mut s.admin_listen, key!(self.admin_listen), addr);
        if let Some(v) = self.upstream {
            match parse_upstream(&v) {
                Ok(a) => s.upstream.authority = a,
                Err(e) => p.0.push(format!("upstream: {e}")),
            }
        }
        let up = &mut s.upstream;
        for (slot, setting) in [
            (&mut up.timeout, key!(self.upstream_timeout)),
            (&mut up.connect_timeout, key!(self.upstream_connect_timeout)),
            (&mut up.body_timeout, key!(self.upstream_body_timeout)),
            (&mut s.header_read_timeout, key!(self.header_read_timeout)),
            (&mut s.admin_header_timeout, key!(self.admin_header_timeout)),
            (&mut s.client_body_timeout, key!(self.client_body_timeout)),
            (&mut s.drain_delay, key!(self.drain_delay)),
            (&mut s.shutdown_grace, key!(self.shutdown_grace)),
        ] {
            p.parse(slot, setting, parse_duration);
        }
        for (key, timeout) in [
            ("client_body_timeout", s.client_body_timeout),
            ("upstream_body_timeout", s.upstream.body_timeout),
            ("admin_header_timeout", s.admin_header_timeout),
        ] {
            p.check(!timeout.is_zero(), || {
                format!("{key}: must be more than 0s")
            });
        }
        p.count(&mut s.max_connections, key!(self.max_connections));
        p.count(
            &mut s.admin_max_connections,
            key!(self.admin_max_connections),
        );
        p.parse(
            &mut s.admin_max_body_bytes,
            key!(self.admin_max_body),
            parse_bytes,
        );
        p.count(
            &mut s.max_concurrent_streams,
            key!(self.max_concurrent_streams),
        );
        let h2 = key!(self.upstream_h2_max_connections);
        p.count(&mut s.upstream.h2_max_connections, h2);
        s.upstream.protocol = self.upstream_protocol.unwrap_or(s.upstream.protocol);
        s.upstream.ready_path = self.upstream_ready_path;
        if let Some(path) = &s.upstream.ready_path {
            p.check(path.starts_with('/'), || {
                format!("upstream_ready_path: {path:?} must start with '/'")
            });
        }
        p.parse(
            &mut s.max_request_body_bytes,
            key!(self.max_request_body),
            parse_bytes,
        );
        if self.max_decided_response.is_some() {
            let setting = key!(self.max_decided_response);
            p.parse(&mut s.max_decided_response_bytes, setting, parse_bytes);
            // Zero would leave every deciding route undecided, silently.
            p.check(s.max_decided_response_bytes != 0, || {
                "max_decided_response: must be at least 1 byte".into()
            });
        }
        p.parse(&mut s.max_record_bytes, key!(self.max_record), parse_bytes);
        s.record_decisions = self.record_decisions.unwrap_or(s.record_decisions);
        p.check(s.max_record_bytes >= 4096, || {
            "max_record: must be at least 4KiB".into()
        });
        s.grpc = grpc_port(self.grpc_listen, self.grpc_upstream, &s.upstream, p);
        s.policy = self.policy;
        s.admin_token_file = self.admin_token_file;
        s.tag_keys_dir = self.tag_keys_dir;
        s.redis_url = self.redis_url;
        if let Some(prefix) = self.redis_key_prefix {
            s.redis_key_prefix = prefix;
        }
        s.redis_password_file = self.redis_password_file;
        s.redis_ca_file = self.redis_ca_file;
        s.redis_client_cert = match (self.redis_client_cert_file, self.redis_client_key_file) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                p.check(false, || {
                    "redis_client_cert_file and redis_client_key_file: give both or neither".into()
                });
                None
            }
        };
        let tls_files = s.redis_ca_file.is_some() || s.redis_client_cert.is_some();
        p.check(
            !tls_files
                || s.redis_url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("rediss://")),
            || "redis_ca_file / redis_client_*: only for a rediss:// redis_url".into(),
        );
        self.spool.apply(&mut s.spool, s.max_record_bytes, p);
        s.kafka = self.kafka.settings(p);
        s
    }
}

/// The gRPC port: both of its settings or neither. Its upstream takes the data port's
/// upstream settings (timeouts, connections) and speaks HTTP/2, as gRPC must.
fn grpc_port(
    listen: Option<String>,
    upstream: Option<String>,
    rest: &Upstream,
    p: &mut Problems,
) -> Option<GrpcPort> {
    match (listen, upstream) {
        (None, None) => None,
        (Some(_), None) => {
            p.0.push("grpc_listen: needs grpc_upstream, the model server's gRPC port (e.g. http://127.0.0.1:8081)".into());
            None
        }
        (None, Some(_)) => {
            p.0.push("grpc_upstream: needs grpc_listen, the address sluicegate serves gRPC on (e.g. 0.0.0.0:8091)".into());
            None
        }
        (Some(listen), Some(upstream)) => {
            let listen = match listen.parse() {
                Ok(a) => Some(a),
                Err(_) => {
                    p.0.push(format!(
                        "grpc_listen: {listen:?} is not an address (host:port)"
                    ));
                    None
                }
            };
            let authority = match parse_upstream(&upstream) {
                Ok(a) => Some(a),
                Err(e) => {
                    p.0.push(format!("grpc_upstream: {e}"));
                    None
                }
            };
            Some(GrpcPort {
                listen: listen?,
                upstream: Upstream {
                    authority: authority?,
                    protocol: UpstreamProtocol::Http2,
                    // The readiness probe asks the REST port; the gRPC port is not probed.
                    ready_path: None,
                    ..rest.clone()
                },
            })
        }
    }
}

impl SpoolArgs {
    fn apply(self, s: &mut SpoolSettings, max_record_bytes: u64, p: &mut Problems) {
        if let Some(dir) = self.dir {
            s.dir = dir;
        }
        p.parse(&mut s.max_bytes, key!(spool: self.max_bytes), parse_bytes);
        p.parse(
            &mut s.segment_bytes,
            key!(spool: self.segment_bytes),
            parse_bytes,
        );
        let fsync = key!(spool: self.fsync_interval);
        p.parse(&mut s.fsync_interval, fsync, parse_duration);
        s.queue_records = self.queue_records.unwrap_or(s.queue_records);
        let mut queue_bytes = s.queue_bytes as u64;
        p.parse(&mut queue_bytes, key!(spool: self.queue_bytes), parse_bytes);
        s.queue_bytes = usize::try_from(queue_bytes).unwrap_or(usize::MAX);
        p.check(s.queue_records != 0, || {
            "spool.queue_records: must be at least 1".into()
        });
        p.check(s.segment_bytes >= max_record_bytes, || {
            format!(
                "spool.segment_bytes: {} is below max_record ({max_record_bytes}); a segment must hold a record",
                s.segment_bytes
            )
        });
        p.check(s.max_bytes >= 2 * s.segment_bytes, || {
            format!(
                "spool.max_bytes: {} must be at least two segments ({})",
                s.max_bytes,
                2 * s.segment_bytes
            )
        });
    }
}

impl KafkaArgs {
    /// `None` without brokers: the spool is the sink.
    fn settings(self, p: &mut Problems) -> Option<KafkaSettings> {
        // The file's properties, then each flag's (or the variable's) over them.
        let mut properties = self.properties;
        for kv in &self.property_args {
            match parse_key_value(kv) {
                Some((k, v)) => {
                    properties.insert(k.to_owned(), v.to_owned());
                }
                None => p.0.push(format!("kafka-property: {kv:?} is not KEY=VALUE")),
            }
        }
        match self.brokers.filter(|b| !b.trim().is_empty()) {
            Some(brokers) => Some(KafkaSettings {
                brokers,
                topic: self.topic.unwrap_or(DEFAULT_TOPIC.into()),
                alerts_topic: self.alerts_topic.unwrap_or(DEFAULT_ALERTS_TOPIC.into()),
                properties,
            }),
            None => {
                p.check(properties.is_empty(), || {
                    "kafka properties are set but no kafka brokers".into()
                });
                None
            }
        }
    }
}

/// Every problem found while resolving, in the order of the keys.
struct Problems(Vec<String>);

impl Problems {
    /// Parses a given value into `slot`, or names the key and the value that did not parse.
    fn parse<T>(
        &mut self,
        slot: &mut T,
        (key, value): (&str, Option<String>),
        parse: impl Fn(&str) -> Option<T>,
    ) {
        if let Some(value) = value {
            match parse(&value) {
                Some(v) => *slot = v,
                None => self.0.push(format!("{key}: cannot parse {value:?}")),
            }
        }
    }

    /// A given count into `slot`; zero is refused.
    fn count<T: Copy + Default + PartialEq>(
        &mut self,
        slot: &mut T,
        (key, value): (&str, Option<T>),
    ) {
        if let Some(n) = value {
            self.check(n != T::default(), || format!("{key}: must be at least 1"));
            *slot = n;
        }
    }

    fn check(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.0.push(problem());
        }
    }
}

/// Splits `KEY=VALUE` at the first `=`, both sides trimmed; `None` without an `=` or a key.
/// Every `KEY=VALUE` flag reads through it.
pub fn parse_key_value(kv: &str) -> Option<(&str, &str)> {
    let (k, v) = kv.split_once('=')?;
    let k = k.trim();
    (!k.is_empty()).then_some((k, v.trim()))
}

/// `parse_bytes` for a clap flag.
pub fn parse_bytes_arg(s: &str) -> Result<u64, String> {
    parse_bytes(s).ok_or_else(|| format!("not a size: {s:?}"))
}

/// `parse_duration` for a clap flag.
pub fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("not a duration: {s:?}"))
}

fn read_file(path: &Path) -> Result<SettingsArgs, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(SettingsArgs::default());
    }
    serde_yaml_ng::from_str(&text).map_err(|e| SettingsError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
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
    fn the_grpc_port_needs_both_settings_and_takes_the_upstream_timeouts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.yaml");
        std::fs::write(
            &path,
            "grpc_listen: 127.0.0.1:8091\ngrpc_upstream: http://m:8081\nupstream_timeout: 7s\n",
        )
        .unwrap();
        let s = args(|a| a.config = Some(path.clone())).resolve().unwrap();
        let grpc = s.grpc.expect("both given: the gRPC port is on");
        assert_eq!(grpc.listen.port(), 8091);
        assert_eq!(grpc.upstream.authority.as_str(), "m:8081");
        assert_eq!(grpc.upstream.timeout, Duration::from_secs(7));
        assert_eq!(grpc.upstream.protocol, UpstreamProtocol::Http2);

        for (listen, upstream, named) in [
            (
                Some("127.0.0.1:8091"),
                None,
                "grpc_listen: needs grpc_upstream",
            ),
            (
                None,
                Some("http://m:8081"),
                "grpc_upstream: needs grpc_listen",
            ),
            (Some("8091"), Some("http://m:8081"), "grpc_listen: \"8091\""),
            (
                Some("127.0.0.1:8091"),
                Some("https://m:8081"),
                "grpc_upstream:",
            ),
        ] {
            let err = args(|a| {
                a.grpc_listen = listen.map(Into::into);
                a.grpc_upstream = upstream.map(Into::into);
            })
            .resolve()
            .unwrap_err()
            .to_string();
            assert!(err.contains(named), "{named}: {err}");
        }
        let off = args(|_| {}).resolve().unwrap();
        assert_eq!(off.grpc, None, "off unless --grpc-listen is given");
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
            a.kafka.property_args = vec!["acks=1".into()];
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
    fn redis_tls_files_load_from_the_file_and_need_rediss_and_both_halves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.yaml");
        std::fs::write(
            &path,
            "redis_url: rediss://r:6380/0\nredis_ca_file: /ca.pem\nredis_client_cert_file: /c.pem\nredis_client_key_file: /c.key\n",
        )
        .unwrap();
        let s = args(|a| a.config = Some(path.clone())).resolve().unwrap();
        assert_eq!(s.redis_ca_file, Some("/ca.pem".into()));
        assert_eq!(
            s.redis_client_cert,
            Some(("/c.pem".into(), "/c.key".into()))
        );

        let err = args(|a| {
            a.redis_url = Some("redis://r:6379/0".into());
            a.redis_ca_file = Some("/ca.pem".into());
        })
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("only for a rediss:// redis_url"), "{err}");
        let err = args(|a| {
            a.redis_url = Some("rediss://r:6380/0".into());
            a.redis_client_cert_file = Some("/c.pem".into());
        })
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("give both or neither"), "{err}");
    }

    #[test]
    fn a_files_sections_may_be_empty_or_partial() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.yaml");
        std::fs::write(&path, "kafka:\nspool:\n").unwrap();
        let s = args(|a| a.config = Some(path.clone())).resolve().unwrap();
        assert!(s.kafka.is_none());
        assert_eq!(s.spool, Settings::default().spool);

        let text = "kafka: {brokers: k:9092}\nspool: {queue_records: 7, queue_bytes: 1MiB}\n";
        std::fs::write(&path, text).unwrap();
        let s = args(|a| {
            a.config = Some(path.clone());
            a.spool.dir = Some("flagged".into());
        })
        .resolve()
        .unwrap();
        let kafka = s.kafka.unwrap();
        assert_eq!(kafka.topic, DEFAULT_TOPIC);
        assert!(kafka.properties.is_empty());
        assert_eq!(s.spool.queue_records, 7, "a key the file alone sets");
        assert_eq!(s.spool.queue_bytes, 1 << 20);
        assert_eq!(s.spool.dir, PathBuf::from("flagged"));
    }

    #[test]
    fn key_value_pairs_are_trimmed_and_need_a_key() {
        assert_eq!(parse_key_value(" acks = all "), Some(("acks", "all")));
        assert_eq!(parse_key_value("a=b=c"), Some(("a", "b=c")));
        assert_eq!(parse_key_value("a="), Some(("a", "")));
        assert_eq!(parse_key_value("=b"), None);
        assert_eq!(parse_key_value("ab"), None);
        let err = args(|a| a.kafka.property_args = vec!["=b".into()])
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kafka-property: \"=b\" is not KEY=VALUE"),
            "{err}"
        );
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
