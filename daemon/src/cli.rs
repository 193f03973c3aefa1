//! The command line, compatible with `qemu-pr-helper`'s so that libvirt
//! (`PROG -k PATH`), KubeVirt and systemd units can run reservd unchanged.
//!
//! This file depends on clap alone: the root build script includes it to
//! generate the man page and shell completions.

use std::path::PathBuf;

use clap::{ArgAction, Parser};

pub const DEFAULT_SOCKET: &str = "/var/run/qemu-pr-helper.sock";
pub const DEFAULT_PIDFILE: &str = "/var/run/qemu-pr-helper.pid";

/// SCSI persistent reservation helper for QEMU, with dm-multipath support.
///
/// reservd executes PERSISTENT RESERVE IN/OUT commands on behalf of QEMU's
/// pr-manager-helper object: QEMU sends each command with the disk's file
/// descriptor over a UNIX socket. On a dm-multipath map the command goes
/// through libmpathpersist so registrations land on every path; on any
/// other SCSI device it is passed through with SG_IO.
#[derive(Debug, Parser)]
#[command(
    name = "reservd",
    version,
    disable_version_flag = true,
    // As with getopt, a repeated option takes its last value.
    args_override_self = true,
    after_help = "The options -k, -f, -d, -T, -u, -g, -v and -q are those of qemu-pr-helper."
)]
pub struct Cli {
    /// Print version information and exit.
    #[arg(short = 'V', long = "version", action = ArgAction::Version)]
    pub version: Option<bool>,

    /// Path of the UNIX socket to listen on; must be absolute.
    /// Default: /var/run/qemu-pr-helper.sock. Not allowed with systemd
    /// socket activation.
    #[arg(short = 'k', long = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Write and lock a pid file. Written whenever given, with or without
    /// -d; with -d alone, /var/run/qemu-pr-helper.pid is used.
    #[arg(short = 'f', long = "pidfile", value_name = "PATH")]
    pub pidfile: Option<PathBuf>,

    /// Run in the background (cwd /, standard streams on /dev/null).
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,

    /// Enable trace events: [[enable=]PATTERN][,events=FILE][,file=FILE].
    /// Events: pr_helper_request, pr_helper_result, pr_helper_connection,
    /// and QEMU's pr_manager_execute / pr_manager_run (aliases of the first
    /// two). file=FILE sends all log output to FILE.
    #[arg(short = 'T', long = "trace", value_name = "SPEC")]
    pub trace: Vec<String>,

    /// User to run as after start-up (name or numeric uid).
    #[arg(short = 'u', long = "user", value_name = "USER")]
    pub user: Option<String>,

    /// Group to run as after start-up (name or numeric gid).
    #[arg(short = 'g', long = "group", value_name = "GROUP")]
    pub group: Option<String>,

    /// Log more (repeat for more detail). The audit trail of PR OUT
    /// commands is logged even without it.
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count)]
    pub verbose: u8,

    /// Log errors only (no audit trail either).
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,

    /// SG_IO timeout for each command, in milliseconds.
    #[arg(long = "sgio-timeout", value_name = "MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub sgio_timeout: u32,

    /// Most client connections served at once; more are refused.
    #[arg(long = "max-connections", value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Offer the CLEANUP protocol extension (feature bit 1, opcode 0xFF),
    /// proposed for QEMU's migration of reservations and in no QEMU release.
    #[arg(long = "enable-cleanup")]
    pub enable_cleanup: bool,

    /// Accepted for compatibility with qemu-pr-helper and ignored.
    #[arg(hide = true, value_name = "FILE")]
    pub ignored: Vec<String>,
}
