//! The `sluicegate` command line: its arguments, and each command's body over the library.
//! A command that fails returns a [`Failure`], which carries the exit code; `main` maps it once.

mod audit;
mod policy;
mod spool;
mod tag;

use std::fmt;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::settings::{parse_bytes_arg, SettingsArgs};

#[derive(Parser)]
#[command(
    name = "sluicegate",
    version,
    about = "A sidecar proxy for model servers: tees every prediction to Kafka"
)]
pub struct Cli {
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
        #[arg(long, default_value = "1MiB", value_parser = parse_bytes_arg)]
        max_record: u64,
        /// The tag key directory `serve` will be given: a policy that tags must find its
        /// signing key there, as `serve` requires at start. Without it, keys are not checked.
        #[arg(long, env = "SLUICEGATE_TAG_KEYS_DIR")]
        tag_keys_dir: Option<PathBuf>,
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
        command: tag::TagCommand,
    },
    /// Feedback-loop, prediction-bias and action-rate reports.
    Audit(Box<audit::AuditArgs>),
    /// Read the spool.
    Spool {
        #[command(subcommand)]
        command: spool::SpoolCommand,
    },
    /// Serve the built-in stand-in model (Open Inference Protocol v2 and TF-Serving v1), to
    /// try sluicegate or benchmark it without a model server.
    StandIn {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// The quickstart: the real proxy in front of a built-in stand-in model, with traffic.
    Demo(crate::demo::DemoOptions),
}

/// Runs the command.
pub fn run(cli: Cli) -> Result<(), Failure> {
    // The demo prints its own story, breaches included; its logs would only interleave with it.
    let quiet = matches!(cli.command, Command::Demo(_));
    crate::telemetry::init_logging(if quiet { "error" } else { "info" });
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Check {
            files,
            max_record,
            tag_keys_dir,
        } => policy::check(&files, max_record, tag_keys_dir.as_deref()),
        Command::Diff { from, to } => policy::diff(&from, &to),
        Command::Tag { command } => tag::run(command),
        Command::Audit(args) => audit::run(&args),
        Command::Spool { command } => spool::run(command),
        Command::StandIn { listen } => runtime().block_on(async move {
            let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
                Failure::new(Exit::Failure, format!("cannot listen on {listen}: {e}"))
            })?;
            tracing::info!(%listen, "stand-in model listening");
            crate::demo::StandInModel::serve(listener).await;
            Ok(())
        }),
        // Exit 1 whatever stopped it (a newer spool included): the demo owns its spool.
        Command::Demo(opts) => runtime()
            .block_on(crate::demo::run(opts))
            .map_err(|e| Failure::new(Exit::Failure, format!("{e:#}"))),
    }
}

fn serve(args: &SettingsArgs) -> Result<(), Failure> {
    use crate::app::StartError;
    let settings = args.resolve().map_err(|e| Failure::new(Exit::Usage, e))?;
    runtime()
        .block_on(crate::app::serve(settings))
        .map_err(|e| {
            let exit = match e {
                StartError::Kafka(_) | StartError::Redis(_) | StartError::Policy { .. } => {
                    Exit::Usage
                }
                StartError::SpoolFormat { .. } => Exit::NewerSpool,
                _ => Exit::Failure,
            };
            Failure::new(exit, e)
        })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The process's exit codes besides 0 (and clap's 2 for arguments it refuses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A failure at run time.
    Failure = 1,
    /// `audit --max-loop-fraction` exceeded: the training pipeline's gate.
    LoopGate = 3,
    /// EX_USAGE from sysexits.h: the input (a flag, a settings or policy file) was wrong.
    Usage = 64,
    /// EX_DATAERR from sysexits.h: the spool is in a format version newer than this build
    /// reads (`serve`, `spool cat`, `audit` on a spool). Nothing in the spool was changed.
    NewerSpool = 65,
}

/// A command that did not succeed: its exit code, and the lines still to print on stderr
/// (none when the command has already said why, on stdout).
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    lines: Vec<String>,
}

impl Failure {
    /// `sluicegate: MESSAGE` on stderr.
    pub fn new(exit: Exit, message: impl fmt::Display) -> Self {
        Failure::lines(exit, vec![format!("sluicegate: {message}")])
    }

    /// These lines on stderr, as they are.
    pub fn lines(exit: Exit, lines: Vec<String>) -> Self {
        Failure { exit, lines }
    }

    /// Nothing on stderr: the command has printed why.
    pub fn silent(exit: Exit) -> Self {
        Failure::lines(exit, Vec::new())
    }

    /// The process's exit code.
    pub fn code(&self) -> u8 {
        self.exit as u8
    }

    /// Prints the lines on stderr.
    pub fn report(&self) {
        for line in &self.lines {
            eprintln!("{line}");
        }
    }
}

/// A command's error from the library: [`Exit::NewerSpool`] if a spool of a newer format
/// stopped it, else [`Exit::Failure`].
impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        use crate::tee::spool::NewerFormat;
        let newer = e.chain().any(|cause| {
            cause.is::<NewerFormat>()
                || cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| NewerFormat::of(io).is_some())
        });
        let exit = if newer {
            Exit::NewerSpool
        } else {
            Exit::Failure
        };
        Failure::new(exit, format!("{e:#}"))
    }
}
