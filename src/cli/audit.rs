//! `sluicegate audit`: its arguments, read into the audit's options.

use std::path::PathBuf;
use std::time::Duration;

use super::{tag, Exit, Failure};
use crate::audit::{self, source::Source, AuditOptions, Format};
use crate::config::settings::{parse_duration_arg, parse_key_value};

#[derive(clap::Args)]
pub(super) struct AuditArgs {
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
    #[arg(long, default_value = "1h", value_parser = parse_duration_arg)]
    bucket: Duration,
    /// `table` for people, `json` for machines, `html` for a page with charts.
    #[arg(long, value_enum, default_value_t, hide_possible_values = true)]
    format: Format,
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

pub(super) fn run(args: &AuditArgs) -> Result<(), Failure> {
    let opts = options(args)?;
    let report = audit::run(&opts)?;
    match args.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        ),
        Format::Table => print!("{}", audit::render_table(&report)),
        Format::Html => print!("{}", audit::render_html(&report)),
    }
    if let Some(max) = args.max_loop_fraction {
        let over = audit::loops_over(&report, max);
        if !over.is_empty() {
            let lines = over
                .into_iter()
                .map(|(set, f)| format!(
                    "sluicegate: training set {set}: {f:.4} of its rows came from models, above --max-loop-fraction {max}"
                ))
                .collect();
            return Err(Failure::lines(Exit::LoopGate, lines));
        }
    }
    Ok(())
}

/// The audit's options, or the first argument that is wrong (exit 64).
fn options(args: &AuditArgs) -> Result<AuditOptions, Failure> {
    let usage = |m: String| Failure::new(Exit::Usage, m);
    let properties = args
        .kafka_properties
        .iter()
        .map(|kv| match parse_key_value(kv) {
            Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
            None => Err(usage(format!("--kafka-property {kv:?} is not KEY=VALUE"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A topic source reads with the consumer flags; a file or spool has none.
    let source = |s: &str| -> Result<Source, Failure> {
        Ok(match Source::parse(s).map_err(usage)? {
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
    let training = args
        .training
        .iter()
        .map(|t| match parse_key_value(t) {
            Some((model, src)) => Ok((model.to_owned(), source(src)?)),
            None => Err(usage(format!("--training {t:?}: expected MODEL=SOURCE"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let predictions = args.predictions.as_deref().map(source).transpose()?;
    let labels = args.labels.as_deref().map(source).transpose()?;
    if predictions.is_none() && training.is_empty() {
        return Err(usage("give --predictions, --training, or both".into()));
    }
    if labels.is_some() && predictions.is_none() {
        return Err(usage("--labels needs --predictions to join against".into()));
    }
    let keys = match &args.keys {
        Some(dir) => tag::load_keys(dir)?,
        None if !training.is_empty() => {
            return Err(usage(
                "--training needs --keys to verify the tags it finds".into(),
            ))
        }
        None => Default::default(),
    };
    let time = |t: &Option<String>| t.as_deref().map(audit::parse_time).transpose();
    let (from_ms, to_ms) = match (time(&args.from), time(&args.to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return Err(usage(e)),
    };
    Ok(AuditOptions {
        predictions,
        training,
        labels,
        keys,
        from_ms,
        to_ms,
        bucket_ms: args.bucket.as_millis().max(1) as i64,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    })
}
