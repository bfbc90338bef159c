//! A real Kafka-protocol broker process: `tansu`, built and cached by tests/install-tansu.sh.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tansu binary, or `None` (with a loud note) when it is not installed. Under
/// tests/run.sh (which sets SLUICEGATE_REQUIRE_KAFKA_TESTS) a missing binary fails the test.
pub fn binary() -> Option<PathBuf> {
    match std::env::var_os("SLUICEGATE_TANSU_BIN") {
        Some(p) if std::path::Path::new(&p).is_file() => Some(p.into()),
        _ if std::env::var_os("SLUICEGATE_REQUIRE_KAFKA_TESTS").is_some() => {
            panic!("SLUICEGATE_TANSU_BIN does not name the tansu binary; run tests/run.sh")
        }
        _ => {
            eprintln!("SKIPPED: no tansu broker (run tests/run.sh to build it and run this test)");
            None
        }
    }
}

pub struct Tansu {
    bin: PathBuf,
    child: Option<Child>,
    pub port: u16,
    advertised_port: u16,
    storage: String,
    workdir: PathBuf,
}

impl Tansu {
    /// Starts a broker on `port`; clients are told to connect to `advertised_port` (a TLS
    /// front, or the same port). `storage` is `memory://tansu/` or `sqlite://NAME`, where tansu
    /// 0.6 reads NAME relative to its working directory (it mangles absolute paths), `workdir`.
    pub fn start(
        bin: PathBuf,
        port: u16,
        advertised_port: u16,
        storage: &str,
        workdir: &std::path::Path,
    ) -> Tansu {
        let mut t = Tansu {
            bin,
            child: None,
            port,
            advertised_port,
            storage: storage.to_owned(),
            workdir: workdir.to_owned(),
        };
        t.restart();
        t
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// (Re)starts the process and waits until it accepts connections.
    pub fn restart(&mut self) {
        let child = Command::new(&self.bin)
            .arg("broker")
            .args(["--listener-url", &format!("tcp://127.0.0.1:{}", self.port)])
            .args([
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", self.advertised_port),
            ])
            .args(["--storage-engine", &self.storage])
            .current_dir(&self.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("SLUICEGATE_TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the broker is gone at once, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new(&self.bin)
            .args(["topic", "create", name])
            .args(["--partitions", &partitions.to_string()])
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create");
        assert!(status.success(), "tansu topic create {name} failed");
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}
