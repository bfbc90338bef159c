//! Composition root: builds everything from the settings, spawns the tasks, owns shutdown.
//!
//! Start-up runs in the order that makes a failure cheap: everything that can refuse the
//! settings (the policy, its keys, the spool's format, Kafka's properties) is checked before a
//! port is bound, so a start that fails has accepted no request and exits 64 or 65 naming the
//! problem; in Kubernetes the pod then never turns ready. Shutdown runs the other way round:
//! stop admitting, finish what was admitted, then flush the tee, and keep the admin port up to
//! the end so the probes and `/metrics` see the whole drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::policy::PolicySpec;
use crate::config::settings::Settings;
use crate::config::validate::{self, PolicyError, PolicyErrors};
use crate::control::reload::{self, Reloader};
use crate::control::{self, Readiness};
use crate::decide::fleet::redis::{FleetRedis, RedisTls};
use crate::policy;
use crate::proxy::body::RequestLimits;
use crate::proxy::server::{self, ListenerLimits};
use crate::proxy::Proxy;
use crate::tee::kafka::{KafkaSender, HANDOFF_BYTES};
use crate::tee::record::{instance_name, EncodeContext};
use crate::tee::spool::{Handoff, NewerFormat, SpoolConfig, SpoolMode, SpoolWriter};
use crate::tee::TeeWriter;
use crate::telemetry::Metrics;

/// How long the fleet limits' refill waits for Redis to connect or answer before the limit
/// counts per pod (a refill runs in the background, so this never delays a request).
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("{0}")]
    Listen(std::io::Error),
    #[error("cannot open the spool at {dir}: {source}")]
    Spool { dir: String, source: std::io::Error },
    /// The spool was written by a newer build (a rollback onto a rolled-out spool).
    #[error("cannot open the spool at {dir}: {source}")]
    SpoolFormat { dir: String, source: NewerFormat },
    #[error("invalid kafka settings: {0}")]
    Kafka(rdkafka::error::KafkaError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("invalid redis settings: {0}")]
    Redis(String),
    #[error("invalid policy {file}:\n{errors}")]
    Policy { file: String, errors: PolicyErrors },
}

/// A running proxy.
pub(crate) struct Running {
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    lifecycle: JoinHandle<()>,
}

impl Running {
    /// Begins a graceful shutdown (as SIGTERM does) and waits for it to finish.
    pub(crate) async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.lifecycle.await;
    }
}

/// Starts the proxy, the admin port, the tee and the readiness probe.
pub(crate) async fn start(settings: Settings) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    // The policy is read and validated first: an invalid one is exit 64 with every error
    // (`StartError::Policy`), never a proxy that serves under a policy the operator did not
    // write. The text is kept for the reloader, which compares content: the first look at an
    // unchanged file then does nothing.
    let policy_text = match &settings.policy {
        Some(file) => Some(
            std::fs::read_to_string(file).map_err(|e| StartError::Policy {
                file: file.display().to_string(),
                errors: PolicyErrors(vec![PolicyError {
                    path: String::new(),
                    message: format!("cannot read it: {e}"),
                }]),
            })?,
        ),
        None => None,
    };
    let initial = match &policy_text {
        Some(text) => validate::parse(text, settings.max_record_bytes).map_err(|errors| {
            StartError::Policy {
                file: settings
                    .policy
                    .as_ref()
                    .map(|f| f.display().to_string())
                    .unwrap_or_default(),
                errors,
            }
        })?,
        // No `--policy`: the built-in default (record everything, redact credentials, decide
        // nothing). An empty policy *file* is refused by `parse`; only its absence means this.
        None => PolicySpec::default(),
    };
    // A policy that tags needs its signing key now: without it every decided response would
    // fail to sign, so the start is refused instead.
    let keys = policy::load_keys(&initial, settings.tag_keys_dir.as_deref()).map_err(|errors| {
        StartError::Policy {
            file: settings
                .policy
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_else(|| "(built-in)".into()),
            errors,
        }
    })?;
    let policy = policy::shared_with_keys(initial, settings.max_record_bytes, keys);
    let fleet_redis = fleet_redis(&settings)?;
    let reloader = Arc::new(Reloader::new(
        policy.clone(),
        settings.policy.clone(),
        policy_text,
        settings.tag_keys_dir.clone(),
        settings.max_record_bytes,
        metrics.policy.clone(),
    ));

    // With Kafka the spool is a backlog of unsent records: when full it keeps what it holds and
    // drops new records (Hold), and only the sender deletes, on acknowledgement. Without Kafka
    // it is the sink itself, a rotating log whose oldest segment goes first (Rotate). Never
    // both: two deleters would account for the same segments twice.
    let spool_config = SpoolConfig {
        dir: settings.spool.dir.clone(),
        max_bytes: settings.spool.max_bytes,
        segment_bytes: settings.spool.segment_bytes,
        fsync_interval: settings.spool.fsync_interval,
        mode: if settings.kafka.is_some() {
            SpoolMode::Hold
        } else {
            SpoolMode::Rotate
        },
    };
    // A spool written by a newer build (a rollback) gets its own error and exit code 65: the
    // operator must decide, and skipping its segments as corrupt would drop their records.
    let spool_err = |source: std::io::Error| {
        let dir = settings.spool.dir.display().to_string();
        match NewerFormat::of(&source) {
            Some(newer) => StartError::SpoolFormat {
                dir,
                source: newer.clone(),
            },
            None => StartError::Spool { dir, source },
        }
    };
    let (mut spool, written) =
        SpoolWriter::open(spool_config, metrics.tee.spool.clone()).map_err(spool_err)?;
    // Read before anything is written: segments below it are an earlier process's, and the
    // sender counts what it sends from them as replayed.
    let first_live_segment = spool.first_segment();

    let kafka = match &settings.kafka {
        Some(kafka) => {
            // The writer hands the sender what it has just written, so a sender that keeps up
            // never reads the spool back; it must be set before the writer thread takes the
            // spool.
            let handoff = Handoff::new(HANDOFF_BYTES);
            spool.set_handoff(handoff.clone());
            let sender = KafkaSender {
                kafka: kafka.clone(),
                spool_dir: settings.spool.dir.clone(),
                max_record_bytes: settings.max_record_bytes,
                metrics: metrics.tee.clone(),
                written,
                first_live_segment,
                handoff: Some(handoff),
            };
            // A property librdkafka rejects is a settings error (exit 64) here, not a sender
            // thread that fails after the proxy is already serving.
            sender.check_config().map_err(StartError::Kafka)?;
            let drain = CancellationToken::new();
            let thread = sender.spawn(drain.clone()).map_err(StartError::Thread)?;
            Some((thread, drain))
        }
        None => None,
    };

    let (tee, writer) = TeeWriter::spawn(
        spool,
        EncodeContext {
            instance: instance_name(),
            max_record_bytes: settings.max_record_bytes as usize,
            record_decisions: settings.record_decisions,
            inbound_tags: metrics.proxy.inbound_tags.clone(),
        },
        &settings.spool,
        metrics.tee.clone(),
    )
    .map_err(StartError::Thread)?;

    // Ports last: every check that can refuse the start has passed, and the tee is running, so
    // the first request accepted already has somewhere to put its record.
    let listener = server::bind(settings.listen, "data port")
        .await
        .map_err(StartError::Listen)?;
    let admin_listener = server::bind(settings.admin_listen, "admin port")
        .await
        .map_err(StartError::Listen)?;
    let grpc_listener = match &settings.grpc {
        Some(grpc) => Some(
            server::bind(grpc.listen, "gRPC port")
                .await
                .map_err(StartError::Listen)?,
        ),
        None => None,
    };
    let data_addr = listener.local_addr().map_err(StartError::Listen)?;
    let admin_addr = admin_listener.local_addr().map_err(StartError::Listen)?;
    let grpc_addr = match &grpc_listener {
        Some(l) => Some(l.local_addr().map_err(StartError::Listen)?),
        None => None,
    };

    let background = Background::default();
    let readiness = Arc::new(Readiness::default());
    // Readiness starts false and only the probe sets it: the pod takes traffic once the model
    // answers, whatever the tee or Kafka is doing.
    background.spawn(control::probe_upstream(
        settings.upstream.clone(),
        readiness.clone(),
        metrics.clone(),
    ));
    background.spawn(control::serve_admin(
        admin_listener,
        Arc::new(control::Admin::new(
            metrics.clone(),
            readiness.clone(),
            reloader.clone(),
            settings.admin_token_file.clone(),
            control::AdminLimits::from_settings(&settings),
        )),
    ));
    background.spawn(reload::watch_file(reloader.clone()));
    background.spawn(reload::on_sighup(reloader));

    // One proxy per port, each with its own upstream; the policy (and so every threshold's and
    // limit's state), the tee and the metrics are the same objects behind both.
    let proxy_to = |upstream| {
        Arc::new(
            Proxy::new(
                upstream,
                RequestLimits::from_settings(&settings),
                policy.clone(),
                tee.clone(),
                metrics.proxy.clone(),
            )
            .with_max_decided_response(settings.max_decided_response_bytes),
        )
    };
    let proxy = proxy_to(settings.upstream.clone());
    let mut ports = vec![(listener, proxy.clone())];
    if let (Some(grpc), Some(listener)) = (&settings.grpc, grpc_listener) {
        ports.push((listener, proxy_to(grpc.upstream.clone())));
    }
    // Once a second, off the request path: adaptive thresholds recomputed, limit windows moved
    // on and their breach alerts sent (once: both ports share the policy's state).
    background.spawn(proxy.run_upkeep());
    background.spawn(control::fleet::run(
        policy.clone(),
        fleet_redis,
        settings.redis_key_prefix.clone(),
        metrics.clone(),
    ));
    let limits = ListenerLimits::from_settings(&settings);
    let shutdown = CancellationToken::new();
    let triggered = shutdown.clone();
    let drain_delay = settings.drain_delay;
    let lifecycle = tokio::spawn(async move {
        // Shutdown order: `/readyz` turns 503 at once, the listener stays open for
        // `--drain-delay` while load balancers catch up, then closes; in-flight requests get
        // `--shutdown-grace` inside `server::serve`.
        let stop_accepting = async {
            triggered.cancelled().await;
            readiness.begin_shutdown();
            tracing::info!(drain_delay = ?drain_delay, "shutting down: draining");
            tokio::time::sleep(drain_delay).await;
        };
        // Returns once every connection is gone, cut or not: every record is queued by then.
        server::serve(ports, limits, stop_accepting).await;
        tracing::info!("listener closed; writing the tee queue to the spool");
        // Closing the writer writes the queue to the spool and fsyncs it; it blocks, so it runs
        // off the runtime's workers. Only then is the sender told to drain (its last 5 s), so
        // it sees the last records; what it cannot deliver stays spooled for the next start.
        let _ = tokio::task::spawn_blocking(move || writer.close()).await;
        if let Some((thread, drain)) = kafka {
            drain.cancel();
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        // Last: the admin port, probes and reload watch live through the whole drain, so the
        // kubelet's liveness probe keeps passing and `/metrics` shows the drain.
        background.stop().await;
        tracing::info!("shutdown complete");
    });

    tracing::info!(
        data = %data_addr,
        admin = %admin_addr,
        grpc = %grpc_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        upstream = %settings.upstream.authority,
        grpc_upstream = %settings.grpc.as_ref().map_or_else(|| "none".to_owned(), |g| g.upstream.authority.to_string()),
        spool = %settings.spool.dir.display(),
        kafka = settings.kafka.as_ref().map_or("none (the spool is the sink)", |k| k.brokers.as_str()),
        "listening"
    );
    Ok(Running {
        data_addr,
        admin_addr,
        metrics,
        shutdown,
        lifecycle,
    })
}

/// The tasks that run beside the data port (admin port, probe, reloads, upkeep) until the end
/// of shutdown.
#[derive(Default)]
struct Background {
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Background {
    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks
            .spawn(self.stop.clone().run_until_cancelled_owned(task));
    }

    /// Stops them and waits until they are gone.
    async fn stop(self) {
        self.tasks.close();
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

/// `sluicegate serve`: runs until SIGTERM or SIGINT, then shuts down gracefully.
pub(crate) async fn serve(settings: Settings) -> Result<(), StartError> {
    let running = start(settings).await?;
    wait_for_signal().await;
    running.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    // SIGINT too: Ctrl-C in a terminal drains like a pod's SIGTERM.
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// The fleet limits' Redis client, if `--redis-url` is set; the password and TLS files are
/// read now.
fn fleet_redis(settings: &Settings) -> Result<Option<FleetRedis>, StartError> {
    let Some(url) = &settings.redis_url else {
        return Ok(None);
    };
    let read = |file: &std::path::Path| {
        std::fs::read(file)
            .map_err(|e| StartError::Redis(format!("cannot read {}: {e}", file.display())))
    };
    let password = match &settings.redis_password_file {
        Some(file) => Some(
            String::from_utf8(read(file)?)
                .map_err(|_| StartError::Redis(format!("{} is not UTF-8", file.display())))?,
        ),
        None => None,
    };
    let password = password
        .as_deref()
        .map(|p| p.trim_end_matches(['\r', '\n']));
    let tls = RedisTls {
        ca: settings.redis_ca_file.as_deref().map(read).transpose()?,
        client: match &settings.redis_client_cert {
            Some((cert, key)) => Some((read(cert)?, read(key)?)),
            None => None,
        },
    };
    FleetRedis::open(url, password, tls, REDIS_TIMEOUT)
        .map(Some)
        .map_err(|e| StartError::Redis(e.to_string()))
}
