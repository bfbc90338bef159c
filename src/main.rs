//! The `sluicegate` command: parses arguments, calls into the library, maps errors to exit
//! codes (64 for a bad setting or file, 65 for a spool written by a newer build, 1 for a
//! failure at run time).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluicegate::config::policy::version_of;
use sluicegate::config::settings::SettingsArgs;
use sluicegate::config::validate;
use sluicegate::tee::record::{v1, RECORD_SCHEMA};
use sluicegate::tee::spool::{EntryKind, NewerFormat, Position, SpoolMetrics, SpoolReader};

/// jemalloc, whose background thread returns freed memory to the OS a few seconds after a burst
/// (glibc's malloc kept it resident), at no cost in CPU per request (measured in
/// docs/performance.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// EX_USAGE from sysexits.h: the input (a flag, a settings or policy file) was wrong.
const EXIT_USAGE: u8 = 64;

/// EX_DATAERR from sysexits.h: the spool is in a format version newer than this build reads
/// (`serve`, `spool cat`, `audit` on a spool). Nothing in the spool was changed.
const EXIT_NEWER_SPOOL: u8 = 65;

#[derive(Parser)]
#[command(
    name = "sluicegate",
    version,
    about = "A sidecar proxy for model servers: tees every prediction to Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in front of a model server.
    Serve(Box<SettingsArgs>),
    /// Validate policy files: exit 0, or 64 with every error and its key path.
    Check {
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The settings' largest record (the body cap may not exceed it).
        #[arg(long, default_value = "1MiB", value_parser = parse_bytes)]
        max_record: u64,
    },
    /// What changes between two policies, by route and setting.
    Diff {
        /// The policy in force.
        from: PathBuf,
        /// The proposed policy.
        to: PathBuf,
    },
    /// Provenance tags: verify one, or make a key.
    Tag {
        #[command(subcommand)]
        command: TagCommand,
    },
    /// Feedback-loop, prediction-bias and action-rate reports.
    Audit(Box<AuditArgs>),
    /// Read the spool.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Serve the built-in stand-in model (Open Inference Protocol v2 and TF-Serving v1), to
    /// try sluicegate or benchmark it without a model server.
    StandIn {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// The quickstart: the real proxy in front of a built-in stand-in model, with traffic.
    Demo {
        /// Send the tee to Kafka instead of the spool alone.
        #[arg(long, env = "SLUICEGATE_KAFKA_BROKERS")]
        kafka_brokers: Option<String>,
        /// How long to drive traffic.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
        /// Requests per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// Where the spool goes.
        #[arg(long, default_value = "sluicegate-demo-spool")]
        spool_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TagCommand {
    /// Decode and verify a tag: prints it, or why it is invalid (exit 1).
    Verify {
        /// The `sluicegate-tag` value.
        token: String,
        /// The key directory (public keys suffice for Ed25519 tags).
        #[arg(long, env = "SLUICEGATE_TAG_KEYS_DIR")]
        keys: PathBuf,
    },
    /// Write a new key into a key directory.
    Keygen {
        /// The key id (also the file name).
        #[arg(long)]
        id: String,
        /// `ed25519` or `hmac-sha256`.
        #[arg(long, default_value = "ed25519")]
        algorithm: String,
        /// The key directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct AuditArgs {
    /// The record stream: spool:DIR or kafka://BROKERS/TOPIC.
    #[arg(long)]
    predictions: Option<String>,
    /// A training set, as MODEL=SOURCE (SOURCE: a JSON-lines file or kafka://BROKERS/TOPIC);
    /// repeatable, one per model trained.
    #[arg(long = "training")]
    training: Vec<String>,
    /// Labels keyed by prediction id (`{"id": "ID" or "ID:row", "label": …}` per line).
    #[arg(long)]
    labels: Option<String>,
    /// The tag key directory (public keys suffice).
    #[arg(long, env = "SLUICEGATE_TAG_KEYS_DIR")]
    keys: Option<PathBuf>,
    /// Only records at or after this time (RFC 3339, or a duration ago: 24h).
    #[arg(long)]
    from: Option<String>,
    /// Only records before this time.
    #[arg(long)]
    to: Option<String>,
    /// Time bucket of the action-rate report.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    bucket: Duration,
    /// `table` for people, `json` for machines.
    #[arg(long, default_value = "table")]
    format: String,
    /// Exit 3 if any training set's share of model-produced rows is above this.
    #[arg(long)]
    max_loop_fraction: Option<f64>,
    /// Commit consumer offsets when reading topics (off: a second run sees the same data).
    #[arg(long)]
    commit: bool,
    /// Consumer group id for topics (default: a fresh one per run).
    #[arg(long)]
    group_id: Option<String>,
    /// A librdkafka property for topic sources, KEY=VALUE (repeatable).
    #[arg(long = "kafka-property")]
    kafka_properties: Vec<String>,
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Print the spool's records as JSON lines (oldest first). Records that do not read as
    /// sluicegate.record.v1 are printed as stored and counted on stderr.
    Cat {
        /// The spool directory.
        dir: PathBuf,
        /// Print the dead-letter records instead.
        #[arg(long)]
        dead_letter: bool,
    },
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    sluicegate::config::units::parse_bytes(s).ok_or_else(|| format!("not a size: {s:?}"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    sluicegate::config::units::parse_duration(s).ok_or_else(|| format!("not a duration: {s:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; its logs would only interleave with it.
    let quiet = matches!(cli.command, Command::Demo { .. });
    sluicegate::telemetry::init_logging(if quiet { "warn" } else { "info" });
    match cli.command {
        Command::Serve(args) => {
            let settings = match args.resolve() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("sluicegate: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let rt = runtime();
            match rt.block_on(sluicegate::app::serve(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(
                    e @ (sluicegate::app::StartError::Kafka(_)
                    | sluicegate::app::StartError::Policy { .. }),
                ) => {
                    eprintln!("sluicegate: {e}");
                    ExitCode::from(EXIT_USAGE)
                }
                Err(e @ sluicegate::app::StartError::SpoolFormat { .. }) => {
                    eprintln!("sluicegate: {e}");
                    ExitCode::from(EXIT_NEWER_SPOOL)
                }
                Err(e) => {
                    eprintln!("sluicegate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { files, max_record } => check(&files, max_record),
        Command::Tag {
            command: TagCommand::Verify { token, keys },
        } => tag_verify(&token, &keys),
        Command::Tag {
            command: TagCommand::Keygen { id, algorithm, dir },
        } => tag_keygen(&id, &algorithm, &dir),
        Command::Audit(args) => audit(&args),
        Command::Diff { from, to } => diff(&from, &to),
        Command::Spool {
            command: SpoolCommand::Cat { dir, dead_letter },
        } => match spool_cat(&dir, dead_letter) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluicegate: {e:#}");
                failure_code(&e)
            }
        },
        Command::StandIn { listen } => runtime().block_on(async move {
            match tokio::net::TcpListener::bind(listen).await {
                Ok(l) => {
                    tracing::info!(%listen, "stand-in model listening");
                    sluicegate::demo::StandInModel::serve(l).await;
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sluicegate: cannot listen on {listen}: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Demo {
            kafka_brokers,
            duration,
            rate,
            spool_dir,
        } => {
            let opts = sluicegate::demo::DemoOptions {
                kafka_brokers,
                duration,
                rate,
                spool_dir,
            };
            match runtime().block_on(sluicegate::demo::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluicegate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(files: &[PathBuf], max_record: u64) -> ExitCode {
    let mut ok = true;
    for file in files {
        match validate::load(file, max_record) {
            Ok(p) => println!(
                "{}: ok (version {}, {} route{})",
                file.display(),
                version_of(&p),
                p.routes.len(),
                if p.routes.len() == 1 { "" } else { "s" }
            ),
            Err(errors) => {
                ok = false;
                for e in errors.0 {
                    println!("{}: {e}", file.display());
                }
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_USAGE)
    }
}

fn diff(from: &std::path::Path, to: &std::path::Path) -> ExitCode {
    // The diff is of meaning, so both sides must be valid policies.
    let max = u64::MAX;
    let (a, b) = match (validate::load(from, max), validate::load(to, max)) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            for (file, r) in [(from, a), (to, b)] {
                if let Err(errors) = r {
                    for e in errors.0 {
                        eprintln!("{}: {e}", file.display());
                    }
                }
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let changes = sluicegate::config::diff::diff(&a, &b);
    println!("version {} → {}", version_of(&a), version_of(&b));
    if changes.is_empty() {
        println!("no change");
    }
    for c in changes {
        println!("{c}");
    }
    ExitCode::SUCCESS
}

fn tag_verify(token: &str, keys: &std::path::Path) -> ExitCode {
    let ring = match sluicegate::provenance::KeyRing::load_dir(keys) {
        Ok(r) => r,
        Err(errors) => {
            for e in errors {
                eprintln!("sluicegate: {e}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match ring.verify(token.trim()) {
        Ok(claims) => {
            println!("valid");
            println!(
                "{}",
                serde_json::to_string_pretty(&claims).expect("claims serialize")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("invalid ({}): {e}", e.kind());
            if let Ok(claims) = sluicegate::provenance::decode_unverified(token.trim()) {
                println!("it claims (unverified):");
                println!(
                    "{}",
                    serde_json::to_string_pretty(&claims).expect("claims serialize")
                );
            }
            ExitCode::FAILURE
        }
    }
}

fn tag_keygen(id: &str, algorithm: &str, dir: &std::path::Path) -> ExitCode {
    let algorithm = match algorithm.parse::<sluicegate::provenance::Algorithm>() {
        Ok(a) => a,
        Err(_) => {
            eprintln!("sluicegate: unknown algorithm {algorithm:?} (ed25519 or hmac-sha256)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match sluicegate::provenance::generate_key(dir, id, algorithm) {
        Ok(paths) => {
            for p in paths {
                println!("wrote {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluicegate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit code when `--max-loop-fraction` is exceeded: the training pipeline's gate.
const EXIT_LOOP_GATE: u8 = 3;

fn audit(args: &AuditArgs) -> ExitCode {
    use sluicegate::audit::{self, source::Source};
    let usage = |m: String| {
        eprintln!("sluicegate: {m}");
        ExitCode::from(EXIT_USAGE)
    };
    let mut properties = Vec::new();
    for kv in &args.kafka_properties {
        match kv.split_once('=') {
            Some((k, v)) => properties.push((k.to_owned(), v.to_owned())),
            None => return usage(format!("--kafka-property {kv:?} is not KEY=VALUE")),
        }
    }
    let source = |s: &str| -> Result<Source, String> {
        Ok(match Source::parse(s)? {
            Source::Kafka { brokers, topic, .. } => Source::Kafka {
                brokers,
                topic,
                commit: args.commit,
                group_id: args.group_id.clone(),
                properties: properties.clone(),
            },
            other => other,
        })
    };
    let mut training = Vec::new();
    for t in &args.training {
        let Some((model, src)) = t.split_once('=') else {
            return usage(format!("--training {t:?}: expected MODEL=SOURCE"));
        };
        match source(src) {
            Ok(s) => training.push((model.to_owned(), s)),
            Err(e) => return usage(e),
        }
    }
    let predictions = match args.predictions.as_deref().map(source).transpose() {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let labels = match args.labels.as_deref().map(source).transpose() {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    if predictions.is_none() && training.is_empty() {
        return usage("give --predictions, --training, or both".into());
    }
    if labels.is_some() && predictions.is_none() {
        return usage("--labels needs --predictions to join against".into());
    }
    let keys = match &args.keys {
        Some(dir) => match sluicegate::provenance::KeyRing::load_dir(dir) {
            Ok(k) => k,
            Err(errors) => {
                for e in errors {
                    eprintln!("sluicegate: {e}");
                }
                return ExitCode::from(EXIT_USAGE);
            }
        },
        None if !training.is_empty() => {
            return usage("--training needs --keys to verify the tags it finds".into())
        }
        None => Default::default(),
    };
    let time = |t: &Option<String>| t.as_deref().map(audit::parse_time).transpose();
    let (from_ms, to_ms) = match (time(&args.from), time(&args.to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return usage(e),
    };
    if !matches!(args.format.as_str(), "table" | "json") {
        return usage(format!("--format {:?}: table or json", args.format));
    }
    let opts = audit::AuditOptions {
        predictions,
        training,
        labels,
        keys,
        from_ms,
        to_ms,
        bucket_ms: args.bucket.as_millis().max(1) as i64,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let report = match audit::run(&opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluicegate: {e:#}");
            return failure_code(&e);
        }
    };
    if args.format == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        print!("{}", audit::render_table(&report));
    }
    if let Some(max) = args.max_loop_fraction {
        let over = audit::loops_over(&report, max);
        if !over.is_empty() {
            for (set, f) in over {
                eprintln!(
                    "sluicegate: training set {set}: {f:.4} of its rows came from models, above --max-loop-fraction {max}"
                );
            }
            return ExitCode::from(EXIT_LOOP_GATE);
        }
    }
    ExitCode::SUCCESS
}

/// The exit code of a command that failed with `e`: [`EXIT_NEWER_SPOOL`] if a spool of a newer
/// format stopped it, else 1.
fn failure_code(e: &anyhow::Error) -> ExitCode {
    let newer = e.chain().any(|cause| {
        cause.is::<NewerFormat>()
            || cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| NewerFormat::of(io).is_some())
    });
    if newer {
        ExitCode::from(EXIT_NEWER_SPOOL)
    } else {
        ExitCode::FAILURE
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn spool_cat(dir: &std::path::Path, dead_letter: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = if dead_letter {
        dir.join("dead-letter")
    } else {
        dir.to_owned()
    };
    if !dir.is_dir() {
        anyhow::bail!("{} is not a spool directory", dir.display());
    }
    let metrics = SpoolMetrics::default();
    let mut reader = SpoolReader::open(&dir, metrics.clone(), false)
        .with_context(|| format!("cannot read {}", dir.display()))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut unreadable = 0u64;
    loop {
        let batch = reader.next_batch(Position::END, 1024)?;
        if batch.is_empty() {
            break;
        }
        for e in batch {
            // Each record is read through the record type; one that does not read is still
            // printed as stored (the spool is evidence), and counted.
            if e.entry.kind == EntryKind::Record
                && serde_json::from_slice::<v1::Record>(&e.entry.payload).is_err()
            {
                unreadable += 1;
            }
            out.write_all(&e.entry.payload)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    let corrupt = metrics.corrupt_skipped.get();
    if corrupt > 0 {
        eprintln!("sluicegate: skipped {corrupt} torn or corrupt frame(s)");
    }
    if unreadable > 0 {
        eprintln!(
            "sluicegate: {unreadable} record(s) do not read as {RECORD_SCHEMA}, printed as stored"
        );
    }
    Ok(())
}
