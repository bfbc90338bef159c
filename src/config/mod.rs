//! Configuration: the static settings (read at start) and the hot policy (swapped live).

pub mod policy;
pub mod settings;
pub mod units;
