//! Configuration, the bottom layer: the static settings (read at start) and the hot policy as
//! written (plain specs, validated whole), with the policy's semantic diff. Nothing here
//! depends on another module of the crate; the compiled policy is [`crate::policy`].

pub(crate) mod diff;
pub mod policy;
pub mod settings;
pub(crate) mod units;
pub mod validate;
