//! What talks to reservd from the outside, and what shows its answers:
//! reservdctl, the tests, the benchmarks and the fuzz harness use it.
//!
//! - [`client`]: a blocking client of the helper protocol that does what
//!   QEMU's pr-manager-helper does;
//! - [`report`]: text and JSON renderings of PR IN data and answers;
//! - [`pathcheck`]: the per-path view of a multipath map's registrations
//!   and the verdict of `reservdctl status`;
//! - [`metrics`]: reservd's metrics from its metrics socket, read back;
//! - [`validate`]: the storage checks of `reservdctl validate`.
#![forbid(unsafe_code)]

pub mod client;
pub mod metrics;
pub mod pathcheck;
pub mod report;
pub mod validate;
