//! `sluicegate check` and `sluicegate diff`.

use std::path::{Path, PathBuf};

use super::{Exit, Failure};
use crate::config::policy::version_of;
use crate::config::validate;

/// Prints each file's verdict on stdout; exit 64 if any is invalid. With `keys`, a policy
/// that tags must also find its signing key there, by the same check `serve` starts with.
pub(super) fn check(
    files: &[PathBuf],
    max_record: u64,
    keys: Option<&Path>,
) -> Result<(), Failure> {
    let mut ok = true;
    for file in files {
        let checked = validate::load(file, max_record).and_then(|p| match keys {
            Some(dir) => crate::policy::load_keys(&p, Some(dir)).map(|_| p),
            None => Ok(p),
        });
        match checked {
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
        Ok(())
    } else {
        Err(Failure::silent(Exit::Usage))
    }
}

pub(super) fn diff(from: &Path, to: &Path) -> Result<(), Failure> {
    // The diff is of meaning, so both sides must be valid policies.
    let max = u64::MAX;
    let (a, b) = match (validate::load(from, max), validate::load(to, max)) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            let mut lines = Vec::new();
            for (file, r) in [(from, a), (to, b)] {
                if let Err(errors) = r {
                    lines.extend(errors.0.iter().map(|e| format!("{}: {e}", file.display())));
                }
            }
            return Err(Failure::lines(Exit::Usage, lines));
        }
    };
    let changes = crate::config::diff::diff(&a, &b);
    println!("version {} → {}", version_of(&a), version_of(&b));
    if changes.is_empty() {
        println!("no change");
    }
    for c in changes {
        println!("{c}");
    }
    Ok(())
}
