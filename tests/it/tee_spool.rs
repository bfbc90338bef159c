//! The tee with no Kafka: the spool is the sink. Records match the JSON Schema, nothing that
//! reached the spool is lost to SIGKILL, and the spool stays within its bound. The spool's
//! format versions: an older build's spool is read and replayed, a newer build's refused.

use std::time::Duration;

use crate::common::kafka::{consume, keys, mock_cluster, start_teeing, TOPIC};
use crate::common::*;
use sluicegate::demo::{v2_request, StandInModel};
use sluicegate::tee::spool::{
    encode_frame, segment_header, EntryKind, SpoolEntry, SEGMENT_HEADER_LEN, SPOOL_FORMAT_VERSION,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gives_one_schema_valid_record() {
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start_proxy(model, spool.path(), &[]);
    let c = client();
    let n = 200;
    let mut ids = std::collections::HashSet::new();
    for i in 0..n {
        let req = http::Request::post(proxy.url("/v2/models/spam-filter/infer"))
            .header("content-type", "application/json")
            .header("authorization", "Bearer secret")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .header("x-request-id", format!("rq-{i}"))
            .header("sluicegate-consumer", "checkout")
            .body(http_body_util::Full::new(bytes::Bytes::from(v2_request(
                1 + i % 3,
                i as u64,
            ))))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        ids.insert(resp.headers()["sluicegate-id"].to_str().unwrap().to_owned());
    }
    // A request the proxy answers itself is recorded too, and validates.
    let (status, _, _) = post(&c, &proxy.url("/nope"), "{").await;
    assert_eq!(status, 404);
    let records = proxy.spool_records_after(spool.path(), (n + 1) as f64);
    assert_eq!(records.len(), n + 1);
    let validator = schema_validator();
    for r in &records {
        let errors: Vec<String> = validator.iter_errors(r).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "record does not match the schema: {errors:?}\n{r}"
        );
    }
    let recorded: std::collections::HashSet<String> = records
        .iter()
        .filter(|r| r["request"]["path"] != "/nope")
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(recorded, ids, "exactly the ids the clients saw");
    let r = records
        .iter()
        .find(|r| r["request"]["path"] != "/nope")
        .unwrap();
    assert_eq!(r["request"]["headers"]["authorization"], "[redacted]");
    assert!(r["request"]["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .starts_with("00-0af7"));
    assert!(r["request"]["headers"]["x-request-id"]
        .as_str()
        .unwrap()
        .starts_with("rq-"));
    assert_eq!(r["consumer"]["id"], "checkout");
    assert!(!r["instance"].as_str().unwrap().is_empty());
    assert_eq!(r["policy"]["generation"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_that_was_reported_written() {
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let mut proxy = start_proxy(model, spool.path(), &[]);
    let c = client();
    let mut ids = Vec::new();
    for i in 0..300 {
        let (status, headers, _) =
            post(&c, &proxy.url("/v2/models/m/infer"), v2_request(2, i)).await;
        assert_eq!(status, 200);
        ids.push(headers["sluicegate-id"].to_str().unwrap().to_owned());
    }
    // Kill only after the proxy reports them written, as the guarantee is stated.
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        300.0,
        Duration::from_secs(10),
    );
    proxy.sigkill();

    let found: std::collections::HashSet<String> = spool_records(spool.path())
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    for id in &ids {
        assert!(found.contains(id), "record {id} lost to SIGKILL");
    }

    // Restarted on the same spool, it keeps the old records and adds new ones after them.
    let proxy = start_proxy(model, spool.path(), &[]);
    let (status, _, _) = post(&c, &proxy.url("/v2/models/m/infer"), v2_request(1, 9)).await;
    assert_eq!(status, 200);
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        1.0,
        Duration::from_secs(10),
    );
    assert_eq!(spool_records(spool.path()).len(), 301);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_without_kafka_rotates_out_its_oldest_segment() {
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start_proxy(model, spool.path(), &SMALL_SPOOL);
    let c = client();
    let mut last = String::new();
    for i in 0..300 {
        let (status, headers, _) =
            post(&c, &proxy.url("/v2/models/m/infer"), v2_request(4, i)).await;
        assert_eq!(status, 200);
        last = headers["sluicegate-id"].to_str().unwrap().to_owned();
    }
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        300.0,
        Duration::from_secs(10),
    );
    assert!(proxy.metric("sluicegate_tee_spool_segments_rotated_total") > 0.0);
    assert!(proxy.metric("sluicegate_tee_spool_bytes") <= (64 << 10) as f64 + (16 << 10) as f64);
    let records = spool_records(spool.path());
    assert!(records.len() < 300, "old records rotated out");
    assert_eq!(
        records.last().unwrap()["id"],
        last.as_str(),
        "the newest record is kept"
    );
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop. `None` when not root
/// (mounting needs it); CI (`SLUICEGATE_REQUIRE_KAFKA_TESTS`) runs as root and must not skip.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let uid = std::process::Command::new("id").arg("-u").output().unwrap();
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            assert!(
                std::env::var_os("SLUICEGATE_REQUIRE_KAFKA_TESTS").is_none(),
                "this test mounts a tmpfs and must run as root here"
            );
            eprintln!("SKIPPED: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs failed");
        Some(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process still holding a file there cannot keep it mounted.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_costs_few_files_and_log_lines_and_is_recovered_from() {
    let Some(fs) = Tmpfs::mount("2m") else { return };
    // Leaves 32 KiB: a few dozen records.
    let filler = fs.dir.path().join("filler");
    std::fs::write(&filler, vec![0u8; (2 << 20) - (32 << 10)]).unwrap();
    let spool = fs.dir.path().join("spool");
    let model = StandInModel::spawn().await.unwrap();
    let proxy = start_proxy(model, &spool, &[]);
    let (ids, failed) = load(proxy.data, 200, Duration::from_secs(3)).await;
    assert_eq!(failed, 0, "a full disk fails no request");
    proxy.wait_metric(
        "sluicegate_tee_records_dropped_spool_error_total",
        1.0,
        Duration::from_secs(5),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let files = std::fs::read_dir(&spool).unwrap().count();
    let errors = proxy
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("ERROR"))
        .count();
    let spooled = proxy.metric("sluicegate_tee_records_spooled_total");
    let dropped = proxy.metric("sluicegate_tee_records_dropped_spool_error_total");
    eprintln!(
        "2 MiB tmpfs with 32 KiB free, {} requests in 3 s: {files} files in the spool, \
         {errors} ERROR lines, {spooled} records spooled, {dropped} dropped and counted, \
         {} failed writes",
        ids.len(),
        proxy.metric("sluicegate_tee_spool_write_errors_total")
    );
    assert!(files <= 3, "{files} files in the spool");
    assert!(errors <= 2, "{errors} ERROR lines");
    assert!(proxy.metric("sluicegate_tee_spool_write_errors_total") >= 1.0);
    assert_eq!(
        spooled + dropped + proxy.metric("sluicegate_tee_records_dropped_queue_full_total"),
        ids.len() as f64,
        "every record spooled or counted"
    );

    // Space returns: records are spooled again within the longest back-off (5 s).
    std::fs::remove_file(&filler).unwrap();
    let c = client();
    let returned = std::time::Instant::now();
    while proxy.metric("sluicegate_tee_records_spooled_total") < spooled + 20.0 {
        assert!(
            returned.elapsed() < Duration::from_secs(10),
            "not recovered"
        );
        let (status, _, _) = post(&c, &proxy.url("/v2/models/m/infer"), v2_request(1, 1)).await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "20 records spooled {:?} after space returned",
        returned.elapsed()
    );
    assert_eq!(proxy.metric("sluicegate_tee_spool_disk_error"), 0.0);
}

/// The segment files in `dir`, with their contents, by name.
fn segment_files(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|d| d.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_builds_spool_stops_serve_and_spool_cat_and_is_kept_whole() {
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let mut proxy = start_proxy(model, spool.path(), &[]);
    let c = client();
    for i in 0..20 {
        let (status, _, _) = post(&c, &proxy.url("/v2/models/m/infer"), v2_request(1, i)).await;
        assert_eq!(status, 200);
    }
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        20.0,
        Duration::from_secs(10),
    );
    assert!(proxy.sigterm().success());
    let records = spool_records(spool.path());
    assert_eq!(records.len(), 20);

    // The spool after a rollback: its segment says one version more than this build reads.
    let (name, mut bytes) = segment_files(spool.path())
        .into_iter()
        .find(|(_, b)| !b.is_empty())
        .unwrap();
    assert_eq!(&bytes[..4], b"SGSV");
    assert_eq!(bytes[4..8], SPOOL_FORMAT_VERSION.to_le_bytes());
    let segment = spool.path().join(&name);
    let newer = SPOOL_FORMAT_VERSION + 1;
    bytes[..SEGMENT_HEADER_LEN].copy_from_slice(&segment_header(newer));
    std::fs::write(&segment, &bytes).unwrap();
    let files = segment_files(spool.path());

    let expect_refusal = |what: &str, code: Option<i32>, stderr: &str| {
        eprintln!("{what}: exit {code:?}, {stderr}");
        assert_eq!(code, Some(65), "{what}: {stderr}");
        for part in [
            segment.display().to_string(),
            format!("spool format version {newer}"),
            format!("reads versions up to {SPOOL_FORMAT_VERSION}"),
            "move the spool directory aside".into(),
        ] {
            assert!(stderr.contains(&part), "{what}: {part:?} not in {stderr}");
        }
    };
    let mut serve = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--upstream", &format!("http://{model}"), "--spool-dir"])
        .arg(spool.path())
        .env_remove("SLUICEGATE_KAFKA_BROKERS")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut serve, Duration::from_secs(20));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut stderr).unwrap();
    expect_refusal("serve", status.code(), &stderr);
    assert!(!stderr.contains("listening"), "it never started: {stderr}");

    let cat = std::process::Command::new(BIN)
        .args(["spool", "cat"])
        .arg(spool.path())
        .output()
        .unwrap();
    expect_refusal(
        "spool cat",
        cat.status.code(),
        &String::from_utf8_lossy(&cat.stderr),
    );
    assert!(cat.stdout.is_empty(), "nothing printed before the refusal");
    let audit = std::process::Command::new(BIN)
        .args(["audit", "--predictions"])
        .arg(format!("spool:{}", spool.path().display()))
        .output()
        .unwrap();
    expect_refusal(
        "audit",
        audit.status.code(),
        &String::from_utf8_lossy(&audit.stderr),
    );
    assert_eq!(
        segment_files(spool.path()),
        files,
        "nothing written, deleted or skipped"
    );

    // Rolled forward to a build that reads it (here: the header put back): every record is there.
    bytes[..SEGMENT_HEADER_LEN].copy_from_slice(&segment_header(SPOOL_FORMAT_VERSION));
    std::fs::write(&segment, &bytes).unwrap();
    assert_eq!(spool_records(spool.path()), records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_builds_headerless_spool_is_read_by_spool_cat_and_replayed() {
    let spool = spool_dir();
    // As the build before versions wrote it: frames from the first byte, no segment header.
    let ids: Vec<String> = (0..50).map(|i| format!("legacy-{i:02}")).collect();
    let mut bytes = Vec::new();
    for id in &ids {
        let entry = SpoolEntry {
            kind: EntryKind::Record,
            timestamp_ms: 1_764_000_000_000,
            key: id.clone(),
            route: "m".into(),
            payload: serde_json::json!({"schema": "sluicegate.record.v1", "id": id})
                .to_string()
                .into_bytes(),
        };
        encode_frame(&entry, &mut bytes);
    }
    let legacy = spool.path().join(format!("{:020}.seg", 1));
    std::fs::write(&legacy, &bytes).unwrap();

    let cat: Vec<String> = spool_records(spool.path())
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(cat, ids);
    // Not whole v1 records: printed as stored, and counted.
    let cat = std::process::Command::new(BIN)
        .args(["spool", "cat"])
        .arg(spool.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&cat.stderr);
    assert!(
        stderr.contains("50 record(s) do not read as sluicegate.record.v1, printed as stored"),
        "{stderr}"
    );

    // Started on it with Kafka: the old records are sent first, then the new ones.
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let model = StandInModel::spawn().await.unwrap();
    let proxy = start_teeing(model, spool.path(), &brokers, &[]);
    let (status, headers, _) = post(
        &client(),
        &proxy.url("/v2/models/m/infer"),
        v2_request(1, 1),
    )
    .await;
    assert_eq!(status, 200);
    let new_id = headers["sluicegate-id"].to_str().unwrap().to_owned();
    proxy.wait_metric(
        "sluicegate_tee_records_replayed_total",
        ids.len() as f64,
        Duration::from_secs(30),
    );
    let got = consume(&brokers, TOPIC, ids.len() + 1, Duration::from_secs(30), &[]);
    let delivered = keys(&got);
    for id in ids.iter().chain([&new_id]) {
        assert!(delivered.contains(id), "{id} not delivered");
    }
    assert_eq!(
        proxy.metric("sluicegate_tee_spool_corrupt_frames_total"),
        0.0
    );
    // Acknowledged whole, the old segment is deleted like any other.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while legacy.exists() {
        assert!(std::time::Instant::now() < deadline, "legacy segment kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
