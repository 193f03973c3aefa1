//! reservd's test kit, shared by the tests of every crate, the benchmarks
//! and the fuzz harness; never part of a shipped build.
//!
//! - [`emulated`]: the in-memory SPC-4 target, the oracle of the protocol
//!   tests;
//! - [`sim`]: a simulated multipath stack on it;
//! - [`server`]: a server running in-process on the emulated target (or
//!   any backend), and a backend that holds commands as a hung device;
//! - [`spawn`]: the one way to start a daemon (or any program), wait for
//!   its socket and stop it; bounded waits;
//! - [`frames`]: connecting, the handshake, raw frames of the helper
//!   protocol;
//! - [`disks`]: temporary files standing for disks, scratch directories;
//! - [`qemu`]: QEMU as a client, and QMP.

pub mod disks;
pub mod emulated;
pub mod frames;
pub mod qemu;
pub mod server;
pub mod sim;
pub mod spawn;
