//! reservd's daemon: executes SCSI persistent reservations for QEMU's
//! pr-manager-helper clients.
//!
//! - [`start`]: the command line and start-up, in qemu-pr-helper's order;
//!   [`run`] is the daemon.
//! - [`server`]: the event loop, the crew of threads that runs it and the
//!   commands, SCM_RIGHTS fd passing.
//! - [`backend`]: what runs a command: SG_IO, or libmpathpersist and the
//!   map's paths for dm-multipath maps (the router picks one per fd).
//! - [`sandbox`]: privileges, the seccomp filter, which clients are served.
//! - [`observe`]: logging, the audit trail, tracing.
//!
//! The pure modules (protocol, SCSI data, libmpathpersist's structures) are
//! the `reservd-proto` crate.

pub mod backend;
pub mod observe;
pub mod sandbox;
pub mod server;
pub mod start;

pub use start::run;
