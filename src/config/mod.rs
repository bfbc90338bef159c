//! Configuration: the static settings (read at start) and the hot policy (validated whole,
//! swapped live), with the policy's semantic diff.

pub mod diff;
pub mod policy;
pub mod settings;
pub mod units;
pub mod validate;
