//! Policy reloads: from the file (watched, including Kubernetes ConfigMap updates that swap a
//! `..data` symlink instead of writing the file), SIGHUP, and the admin API. Every reload
//! validates first and swaps atomically; an invalid policy is refused whole and the old one
//! keeps serving. Thresholds and limits whose settings did not change keep their state.
//!
//! The rules that keep a reload from doing harm:
//! - The watch acts on content, not on events: the policy file and the tag key files are
//!   fingerprinted, and a set of files whose content is the one last acted on does nothing
//!   (no reload, no counted failure), however many events or polls arrive.
//! - A changed file is applied only once its content has held for [`STABLE_FOR`] (two equal
//!   reads), so a file being written in place is never applied half-way.
//! - A policy put through the API holds until the file's content next changes; `POST
//!   /admin/reload` and SIGHUP apply the file at once and end that override.
//! - A change to the key files alone re-reads the keys for the policy in force, whatever its
//!   origin (a rotated key Secret is picked up without a restart).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::config::policy::PolicySpec;
use crate::config::validate::{self, PolicyErrors};
use crate::policy::{load_keys, Policy, SharedPolicy};
use crate::provenance::KeyRing;
use crate::telemetry::PolicyMetrics;

/// How long a changed policy file's content must stay the same before it is applied.
pub(crate) const STABLE_FOR: Duration = Duration::from_secs(1);

/// What a reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reloaded {
    /// A new policy version is in force.
    Applied { version: String, generation: u64 },
    /// The policy is the one already in force.
    Unchanged { version: String },
}

/// What asked for a reload, for logs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Source {
    File,
    Signal,
    Api,
}

/// Where the policy in force came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The built-in default: the proxy was started without `--policy`.
    Default,
    /// The policy file.
    File,
    /// `PUT /admin/policy`; holds until the file's content next changes.
    Api,
}

impl Origin {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Origin::Default => "default",
            Origin::File => "file",
            Origin::Api => "api",
        }
    }
}

/// The watched files' content as last read: the policy text and a digest of the key files.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Contents {
    /// The policy file's text, or why it could not be read.
    policy: Result<String, String>,
    keys: [u8; 32],
}

/// What the reloader knows beyond the snapshot; behind the lock that serializes reloads.
#[derive(Debug)]
struct State {
    origin: Origin,
    /// The files' content as last acted on (applied or refused).
    seen: Option<Contents>,
}

/// Applies policies, one at a time.
pub(crate) struct Reloader {
    policy: SharedPolicy,
    file: Option<PathBuf>,
    keys_dir: Option<PathBuf>,
    max_record_bytes: u64,
    metrics: PolicyMetrics,
    /// Serializes reloads (two at once could each build from the same previous snapshot)
    /// and holds what they share.
    state: Mutex<State>,
}

impl Reloader {
    /// `policy` holds the policy loaded at start: from `file` if there is one (read as
    /// `initial_text`), else the built-in default.
    pub(crate) fn new(
        policy: SharedPolicy,
        file: Option<PathBuf>,
        initial_text: Option<String>,
        keys_dir: Option<PathBuf>,
        max_record_bytes: u64,
        metrics: PolicyMetrics,
    ) -> Self {
        let origin = if file.is_some() {
            Origin::File
        } else {
            Origin::Default
        };
        let seen = initial_text.map(|text| Contents {
            policy: Ok(text),
            keys: keys_digest(keys_dir.as_deref()),
        });
        let snapshot = policy.load();
        metrics.set_version(&snapshot.version, snapshot.generation, origin.as_str());
        Reloader {
            policy: policy.clone(),
            file,
            keys_dir,
            max_record_bytes,
            metrics,
            state: Mutex::new(State { origin, seen }),
        }
    }

    pub(crate) fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    pub(crate) fn keys_dir(&self) -> Option<&Path> {
        self.keys_dir.as_deref()
    }

    /// The policy in force and where it came from.
    pub(crate) async fn current_with_origin(&self) -> (Arc<Policy>, Origin) {
        let state = self.state.lock().await;
        (self.policy.load_full(), state.origin)
    }

    /// Applies the policy file now, as read now (SIGHUP, `POST /admin/reload`): ends an API
    /// override.
    pub(crate) async fn reload_file(&self, source: Source) -> Result<Reloaded, PolicyErrors> {
        if self.file.is_none() {
            return Err(one_error(
                "no policy file is configured (--policy); nothing to reload",
            ));
        }
        let contents = self.read_contents().await;
        let mut state = self.state.lock().await;
        self.apply_file(&mut state, contents, source)
    }

    /// Validates `text` and, if it is a valid policy, swaps it in (`PUT /admin/policy`). It
    /// holds until the file's content next changes.
    pub(crate) async fn apply_text(
        &self,
        text: &str,
        source: Source,
    ) -> Result<Reloaded, PolicyErrors> {
        let mut state = self.state.lock().await;
        let reloaded = self.apply(text, source)?;
        state.origin = Origin::Api;
        self.publish(&state);
        Ok(reloaded)
    }

    /// The watch's entry point: acts if the policy file or the key files changed since they
    /// were last acted on, once their content has held for [`STABLE_FOR`]. `None`: nothing
    /// changed.
    pub(crate) async fn on_files_changed(&self) -> Option<Result<Reloaded, PolicyErrors>> {
        self.file.as_ref()?;
        let mut contents = self.read_contents().await;
        if self.state.lock().await.seen.as_ref() == Some(&contents) {
            return None;
        }
        // Written in place (an editor, `cat >`): wait until two reads a while apart agree.
        loop {
            tokio::time::sleep(STABLE_FOR).await;
            let again = self.read_contents().await;
            if again == contents {
                break;
            }
            contents = again;
        }
        let mut state = self.state.lock().await;
        let seen = state.seen.clone();
        match seen {
            // Another reload got there first.
            Some(seen) if seen == contents => None,
            // Only the keys changed: re-read them for the policy in force, whatever its origin.
            Some(seen) if seen.policy == contents.policy => {
                state.seen = Some(contents);
                Some(self.reload_keys(&state))
            }
            _ => Some(self.apply_file(&mut state, contents, Source::File)),
        }
    }

    async fn read_contents(&self) -> Contents {
        let policy = match &self.file {
            Some(file) => tokio::fs::read_to_string(file)
                .await
                .map_err(|e| format!("cannot read {}: {e}", file.display())),
            None => Err("no policy file".into()),
        };
        let keys_dir = self.keys_dir.clone();
        let keys = tokio::task::spawn_blocking(move || keys_digest(keys_dir.as_deref()))
            .await
            .unwrap_or_default();
        Contents { policy, keys }
    }

    /// Applies the file's `contents` and remembers them as acted on, applied or refused: the
    /// same content is not tried (nor counted as a failure) again.
    fn apply_file(
        &self,
        state: &mut State,
        contents: Contents,
        source: Source,
    ) -> Result<Reloaded, PolicyErrors> {
        let result = match &contents.policy {
            Ok(text) => self.apply(text, source),
            Err(message) => {
                let err = one_error(message);
                self.refused(source, &err);
                Err(err)
            }
        };
        state.seen = Some(contents);
        if result.is_ok() {
            state.origin = Origin::File;
            self.publish(state);
        }
        result
    }

    fn reload_keys(&self, state: &State) -> Result<Reloaded, PolicyErrors> {
        let current = self.policy.load_full();
        let keys = load_keys(&current.spec, self.keys_dir.as_deref()).inspect_err(|errors| {
            self.refused(Source::File, errors);
        })?;
        let reloaded = self.swap(current.spec.clone(), keys, &current, Source::File);
        tracing::info!(origin = state.origin.as_str(), "tag keys reloaded");
        Ok(reloaded)
    }

    fn apply(&self, text: &str, source: Source) -> Result<Reloaded, PolicyErrors> {
        let current = self.policy.load_full();
        let policy = validate::parse(text, self.max_record_bytes).inspect_err(|errors| {
            self.refused(source, errors);
        })?;
        // Keys are read at every reload, even of an unchanged policy: a rotated Secret.
        let keys = load_keys(&policy, self.keys_dir.as_deref()).inspect_err(|errors| {
            self.refused(source, errors);
        })?;
        Ok(self.swap(policy, keys, &current, source))
    }

    fn swap(
        &self,
        policy: PolicySpec,
        keys: Arc<KeyRing>,
        current: &Policy,
        source: Source,
    ) -> Reloaded {
        let new_version = crate::config::policy::version_of(&policy);
        if new_version == current.version {
            // Same meaning: the same generation, with the keys as they are now on disk.
            let snapshot = Policy::new(
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
            Policy::new(policy, generation, self.max_record_bytes, Some(current)).with_keys(keys);
        let version = snapshot.version.clone();
        self.policy.store(Arc::new(snapshot));
        tracing::info!(?source, from = %current.version, to = %version, generation, "policy applied");
        Reloaded::Applied {
            version,
            generation,
        }
    }

    fn publish(&self, state: &State) {
        let s = self.policy.load();
        self.metrics
            .set_version(&s.version, s.generation, state.origin.as_str());
    }

    fn refused(&self, source: Source, errors: &PolicyErrors) {
        self.metrics.reload_failures.inc();
        tracing::warn!(?source, errors = %errors.to_string().replace('\n', "; "), "policy refused; the policy in force keeps serving");
    }
}

/// A digest of every key file in `dir` (names and content, in name order); a listing or read
/// error is part of it, so its change is seen too.
fn keys_digest(dir: Option<&Path>) -> [u8; 32] {
    let mut hash = Sha256::new();
    let Some(dir) = dir else {
        return hash.finalize().into();
    };
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut names: Vec<_> = entries
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                // `..data` and friends: Kubernetes' own links, not keys.
                .filter(|n| !n.to_string_lossy().starts_with('.'))
                .collect();
            names.sort();
            for name in names {
                hash.update(name.as_encoded_bytes());
                hash.update([0]);
                match std::fs::read(dir.join(&name)) {
                    Ok(bytes) => {
                        hash.update((bytes.len() as u64).to_le_bytes());
                        hash.update(&bytes);
                    }
                    Err(e) => hash.update(format!("unreadable: {e}")),
                }
            }
        }
        Err(e) => hash.update(format!("cannot list: {e}")),
    }
    hash.finalize().into()
}

fn one_error(message: &str) -> PolicyErrors {
    PolicyErrors(vec![validate::PolicyError {
        path: String::new(),
        message: message.to_owned(),
    }])
}

/// Watches the policy file's directory (a ConfigMap update renames `..data`, which a watch on
/// the file itself would miss) and the tag key directory, and reloads when their content
/// changes. A slow poll backs the watch up, in case the platform drops events.
pub(crate) async fn watch_file(reloader: Arc<Reloader>) {
    let Some(file) = reloader.file().map(Path::to_path_buf) else {
        return;
    };
    let parent = |p: &Path| {
        p.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    let mut dirs = vec![parent(&file)];
    dirs.extend(reloader.keys_dir().map(Path::to_path_buf));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watcher = {
        use notify::Watcher;
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reading a file is an event too (open, close): reacting to those would make every
            // reload's own reads trigger the next one.
            if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| {
            for dir in &dirs {
                w.watch(dir, notify::RecursiveMode::NonRecursive)?;
            }
            Ok(w)
        })
    };
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, dirs = ?dirs, "cannot watch the policy and key directories; polling every 5s instead");
            None
        }
    };
    let poll = Duration::from_secs(if _watcher.is_some() { 30 } else { 5 });
    // A change made between the start's read and the watch's start is seen now.
    let _ = reloader.on_files_changed().await;
    loop {
        tokio::select! {
            _ = rx.recv() => {
                // Editors and the kubelet write in several steps: let them finish.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(poll) => {}
        }
        let _ = reloader.on_files_changed().await;
    }
}

/// Reloads the policy file on SIGHUP.
pub(crate) async fn on_sighup(reloader: Arc<Reloader>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy;

    const A: &str = "tee: {sample_rate: 0.5}\n";
    const B: &str = "tee: {sample_rate: 0.25}\n";

    fn reloader(dir: &Path, text: &str) -> (Reloader, SharedPolicy, PolicyMetrics) {
        let file = dir.join("policy.yaml");
        std::fs::write(&file, text).unwrap();
        let shared = policy::shared(validate::parse(text, 1 << 20).unwrap(), 1 << 20);
        let metrics = PolicyMetrics::default();
        let r = Reloader::new(
            shared.clone(),
            Some(file),
            Some(text.to_owned()),
            None,
            1 << 20,
            metrics.clone(),
        );
        (r, shared, metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_files_cause_no_reload_and_no_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _, metrics) = reloader(dir.path(), A);
        for _ in 0..10 {
            assert!(r.on_files_changed().await.is_none());
        }
        // An invalid file is refused once, then left alone until its content changes.
        std::fs::write(dir.path().join("policy.yaml"), "tee: [").unwrap();
        assert!(matches!(r.on_files_changed().await, Some(Err(_))));
        for _ in 0..10 {
            assert!(r.on_files_changed().await.is_none());
        }
        assert_eq!(metrics.reload_failures.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_api_policy_holds_until_the_file_changes_and_reload_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let (r, shared, _) = reloader(dir.path(), A);
        r.apply_text(B, Source::Api).await.unwrap();
        assert!(r.on_files_changed().await.is_none());
        assert_eq!(shared.load().spec.tee.sample_rate, 0.25);
        assert_eq!(r.current_with_origin().await.1, Origin::Api);

        // POST /admin/reload and SIGHUP re-apply the file.
        r.reload_file(Source::Signal).await.unwrap();
        assert_eq!(shared.load().spec.tee.sample_rate, 0.5);
        assert_eq!(r.current_with_origin().await.1, Origin::File);

        // A change of the file's content ends an override too.
        r.apply_text(B, Source::Api).await.unwrap();
        std::fs::write(dir.path().join("policy.yaml"), "tee: {sample_rate: 0.75}\n").unwrap();
        assert!(matches!(r.on_files_changed().await, Some(Ok(_))));
        assert_eq!(shared.load().spec.tee.sample_rate, 0.75);
        assert_eq!(r.current_with_origin().await.1, Origin::File);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_file_or_body_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (r, shared, metrics) = reloader(dir.path(), A);
        assert!(r.apply_text("", Source::Api).await.is_err());
        std::fs::write(dir.path().join("policy.yaml"), "").unwrap();
        assert!(matches!(r.on_files_changed().await, Some(Err(_))));
        assert_eq!(shared.load().spec.tee.sample_rate, 0.5);
        assert_eq!(metrics.reload_failures.get(), 2);
    }
}
