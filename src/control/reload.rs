//! Policy reloads: from the file (watched, including Kubernetes ConfigMap updates that swap a
//! `..data` symlink instead of writing the file), SIGHUP, and the admin API. Every reload
//! validates first and swaps atomically; an invalid policy is refused whole and the old one
//! keeps serving. Thresholds and limits whose settings did not change keep their state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::config::policy::{load_keys, Policy, PolicySnapshot, SharedPolicy};
use crate::config::validate::{self, PolicyErrors};
use crate::provenance::KeyRing;
use crate::telemetry::PolicyMetrics;

/// What a reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// A new policy version is in force.
    Applied { version: String, generation: u64 },
    /// The policy is the one already in force.
    Unchanged { version: String },
}

/// Where a reload came from, for logs.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    File,
    Signal,
    Api,
}

/// Applies policies, one at a time.
pub struct Reloader {
    policy: SharedPolicy,
    file: Option<PathBuf>,
    keys_dir: Option<PathBuf>,
    max_record_bytes: u64,
    metrics: PolicyMetrics,
    /// Serializes reloads: two at once could each build from the same previous snapshot.
    lock: Mutex<()>,
}

impl Reloader {
    pub fn new(
        policy: SharedPolicy,
        file: Option<PathBuf>,
        keys_dir: Option<PathBuf>,
        max_record_bytes: u64,
        metrics: PolicyMetrics,
    ) -> Self {
        Reloader {
            policy,
            file,
            keys_dir,
            max_record_bytes,
            metrics,
            lock: Mutex::new(()),
        }
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    pub fn current(&self) -> Arc<PolicySnapshot> {
        self.policy.load_full()
    }

    /// Reads the policy file again and applies it if it changed.
    pub async fn reload_file(&self, source: Source) -> Result<Reloaded, PolicyErrors> {
        let Some(file) = &self.file else {
            return Err(one_error(
                "no policy file is configured (--policy); nothing to reload",
            ));
        };
        let text = match tokio::fs::read_to_string(file).await {
            Ok(t) => t,
            Err(e) => {
                let err = one_error(&format!("cannot read {}: {e}", file.display()));
                self.refused(source, &err);
                return Err(err);
            }
        };
        self.apply_text(&text, source).await
    }

    /// Validates `text` and, if it is a valid policy, swaps it in.
    pub async fn apply_text(&self, text: &str, source: Source) -> Result<Reloaded, PolicyErrors> {
        let _one_at_a_time = self.lock.lock().await;
        let current = self.policy.load_full();
        let policy = match validate::parse(text, self.max_record_bytes) {
            Ok(p) => p,
            Err(errors) => {
                self.refused(source, &errors);
                return Err(errors);
            }
        };
        // Keys are read at every reload, even of an unchanged policy: a rotated Secret.
        let keys = match load_keys(&policy, self.keys_dir.as_deref()) {
            Ok(k) => k,
            Err(errors) => {
                self.refused(source, &errors);
                return Err(errors);
            }
        };
        Ok(self.swap(policy, keys, &current, source))
    }

    fn swap(
        &self,
        policy: Policy,
        keys: Arc<KeyRing>,
        current: &PolicySnapshot,
        source: Source,
    ) -> Reloaded {
        let new_version = crate::config::policy::version_of(&policy);
        if new_version == current.version {
            // Same meaning: the same generation, with the keys as they are now on disk.
            let snapshot = PolicySnapshot::new(
                policy,
                current.generation,
                self.max_record_bytes,
                Some(current),
            )
            .with_keys(keys);
            self.policy.store(Arc::new(snapshot));
            return Reloaded::Unchanged {
                version: new_version,
            };
        }
        let generation = current.generation + 1;
        let snapshot =
            PolicySnapshot::new(policy, generation, self.max_record_bytes, Some(current))
                .with_keys(keys);
        let version = snapshot.version.clone();
        self.policy.store(Arc::new(snapshot));
        self.metrics.set_version(&version, generation);
        tracing::info!(?source, from = %current.version, to = %version, generation, "policy applied");
        Reloaded::Applied {
            version,
            generation,
        }
    }

    fn refused(&self, source: Source, errors: &PolicyErrors) {
        self.metrics.reload_failures.inc();
        tracing::warn!(?source, errors = %errors.to_string().replace('\n', "; "), "policy refused; the policy in force keeps serving");
    }
}

fn one_error(message: &str) -> PolicyErrors {
    PolicyErrors(vec![validate::PolicyError {
        path: String::new(),
        message: message.to_owned(),
    }])
}

/// Watches the policy file's directory (a ConfigMap update renames `..data`, which a watch on
/// the file itself would miss) and reloads on any change, debounced. A slow poll backs the
/// watch up, in case the platform drops events.
pub async fn watch_file(reloader: Arc<Reloader>) {
    let Some(file) = reloader.file().map(Path::to_path_buf) else {
        return;
    };
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watcher = {
        use notify::Watcher;
        let tx = tx.clone();
        notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
            let _ = tx.try_send(());
        })
        .and_then(|mut w| {
            w.watch(&dir, notify::RecursiveMode::NonRecursive)
                .map(|_| w)
        })
    };
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the policy directory; polling every 5s instead");
            None
        }
    };
    let poll = Duration::from_secs(if _watcher.is_some() { 30 } else { 5 });
    loop {
        tokio::select! {
            _ = rx.recv() => {
                // Editors and the kubelet write in several steps: let them finish.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(poll) => {}
        }
        let _ = reloader.reload_file(Source::File).await;
    }
}

/// Reloads the policy file on SIGHUP.
pub async fn on_sighup(reloader: Arc<Reloader>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the policy");
        let _ = reloader.reload_file(Source::Signal).await;
    }
}
