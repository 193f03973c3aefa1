//! reservd's test kit, shared by the tests of every crate, the benchmarks
//! and the fuzz harness; never part of a shipped build.
//!
//! - [`emulated`]: the in-memory SPC-4 target, the oracle of the protocol
//!   tests;
//! - [`sim`]: a simulated multipath stack on it;
//! - [`server`]: a server running in-process on the emulated target (or
//!   any backend), and a backend that holds commands as a hung device;
//! - [`spawn`]: child processes (the daemon, QEMU) that are always
//!   reaped, bounded waits;
//! - [`frames`]: raw frames of the helper protocol.

pub mod emulated;
pub mod frames;
pub mod server;
pub mod sim;
pub mod spawn;
