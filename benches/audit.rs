//! `sluicegate audit` throughput: writes N decided records (default 1,000,000) into a spool,
//! then times the audit over it (action rates over time, and bias against labels for 1% of
//! the predictions). Prints records per second.
//!
//! Run: `cargo bench --bench audit` (env: AUDIT_RECORDS=1000000).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluicegate::audit::{self, source::Source, AuditOptions};
use sluicegate::tee::spool::{
    EntryKind, SpoolConfig, SpoolEntry, SpoolMetrics, SpoolMode, SpoolWriter,
};

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("audit: a benchmark; run it with `cargo bench --bench audit`");
        return;
    }
    let n: u64 = std::env::var("AUDIT_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let (mut writer, _) = SpoolWriter::open(
        SpoolConfig {
            dir: spool.clone(),
            max_bytes: 64 << 30,
            segment_bytes: 64 << 20,
            fsync_interval: Duration::from_secs(3600),
            mode: SpoolMode::Hold,
        },
        SpoolMetrics::default(),
    )
    .unwrap();
    let start_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 86_400_000;
    let mut labels = String::new();
    let write_start = Instant::now();
    let mut batch = Vec::with_capacity(1000);
    for i in 0..n {
        let ms = start_ms + (i as i64 * 86_400_000 / n as i64);
        let time = humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_millis(ms as u64));
        let id = format!("01a2{i:028x}");
        let spam = i % 37 == 0;
        let action = if spam { "spam" } else { "ham" };
        let record = format!(
            r#"{{"schema":"sluicegate.record.v1","id":"{id}","time":"{time}","instance":"bench","route":"spam","model":{{"name":"spam-filter","version":"3"}},"consumer":{{"id":"mail","declared":true}},"policy":{{"version":"0c9ca2fc0320","generation":0}},"request":{{"method":"POST","path":"/v2/models/spam-filter/infer","query":null,"headers":{{"content-type":"application/json"}},"v2_id":null,"body":{{"encoding":"json","data":{{"inputs":[{{"name":"features","shape":[1,4],"datatype":"FP64","data":[0.1,0.2,0.3,0.4]}}]}},"size":96,"truncated":false}}}},"response":{{"status":200,"headers":{{}},"trailers":null,"body":{{"encoding":"json","data":{{"model_name":"spam-filter","model_version":"3","outputs":[{{"name":"predict_proba","shape":[1,2],"datatype":"FP64","data":[0.2,0.8]}}]}},"size":120,"truncated":false}}}},"status":200,"error":null,"complete":true,"tag":null,"inbound_tags":[],"decisions":[{{"row":0,"score":0.8,"threshold":0.97,"threshold_mode":"adaptive","model_action":"{action}","final_action":"{action}","limit":"ok","explored":false}}],"decision_error":null,"timings":{{"upstream_ms":1.0,"total_ms":1.1}}}}"#
        );
        if i % 100 == 0 {
            labels.push_str(&format!(
                "{{\"id\":\"{id}:0\",\"label\":\"{}\"}}\n",
                if i % 3 == 0 { "spam" } else { "ham" }
            ));
        }
        batch.push(SpoolEntry {
            kind: EntryKind::Record,
            timestamp_ms: ms,
            key: id,
            route: "spam".into(),
            payload: record.into_bytes(),
        });
        if batch.len() == 1000 {
            writer.append_batch(&batch).unwrap();
            batch.clear();
        }
    }
    writer.append_batch(&batch).unwrap();
    writer.sync().unwrap();
    let labels_file = dir.path().join("labels.jsonl");
    std::fs::write(&labels_file, labels).unwrap();
    println!(
        "wrote {n} records in {:.1}s",
        write_start.elapsed().as_secs_f64()
    );

    let opts = AuditOptions {
        predictions: Some(Source::Spool(spool)),
        training: Vec::new(),
        labels: Some(Source::File(labels_file)),
        keys: Default::default(),
        from_ms: None,
        to_ms: None,
        bucket_ms: 3_600_000,
        progress: false,
    };
    let start = Instant::now();
    let report = audit::run(&opts).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(report.predictions_read, n);
    println!(
        "audit read {n} records in {secs:.2}s: {:.0} records/s ({} hourly rows, {} bias rows)",
        n as f64 / secs,
        report.action_rates.len(),
        report.bias.len()
    );
}
