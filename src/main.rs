//! The `sluicegate` command: parses arguments, calls into the library, maps errors to exit
//! codes (64 for a bad setting or file, 1 for a failure at run time).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluicegate::config::policy::version_of;
use sluicegate::config::settings::SettingsArgs;
use sluicegate::config::validate;
use sluicegate::tee::spool::{Position, SpoolMetrics, SpoolReader};

/// EX_USAGE from sysexits.h: the input (a flag, a settings or policy file) was wrong.
const EXIT_USAGE: u8 = 64;

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
enum SpoolCommand {
    /// Print the spool's records as JSON lines (oldest first).
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
                Err(e) => {
                    eprintln!("sluicegate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { files, max_record } => check(&files, max_record),
        Command::Diff { from, to } => diff(&from, &to),
        Command::Spool {
            command: SpoolCommand::Cat { dir, dead_letter },
        } => match spool_cat(&dir, dead_letter) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluicegate: {e:#}");
                ExitCode::FAILURE
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
    loop {
        let batch = reader.next_batch(Position::END, 1024)?;
        if batch.is_empty() {
            break;
        }
        for e in batch {
            out.write_all(&e.entry.payload)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    let corrupt = metrics.corrupt_skipped.get();
    if corrupt > 0 {
        eprintln!("sluicegate: skipped {corrupt} torn or corrupt frame(s)");
    }
    Ok(())
}
