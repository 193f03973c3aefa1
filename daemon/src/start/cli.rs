//! The command line, compatible with `qemu-pr-helper`'s so that libvirt
//! (`PROG -k PATH`), KubeVirt and systemd units can run reservd unchanged.
//!
//! This file depends on clap alone: the root build script includes it to
//! generate the man page and shell completions.
// The doc comments below are reservd's --help and man page, where the
// brackets of an option's syntax ([[enable=]PATTERN]...) are brackets.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;

use clap::{ArgAction, Parser};

/// An octal file mode of at most 0777.
fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("invalid mode '{s}' (octal, at most 0777)")),
    }
}

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

    /// Close a client that starts a request (or its handshake) and does not
    /// finish it within SECONDS; 0: never. Idle connections are kept.
    #[arg(long = "frame-timeout", value_name = "SECONDS", default_value_t = 60)]
    pub frame_timeout: u32,

    /// Offer the CLEANUP protocol extension (feature bit 1, opcode 0xFF),
    /// proposed for QEMU's migration of reservations and in no QEMU release.
    #[arg(long = "enable-cleanup")]
    pub enable_cleanup: bool,

    /// System call filter installed once privileges are dropped, on every
    /// thread: "enforce" makes a system call outside reservd's allow-list
    /// fail with EPERM; "log" lets it through and has the kernel log it
    /// (audit type 1326, SECCOMP); "off" installs no filter.
    #[arg(long = "seccomp", value_name = "MODE", default_value = "enforce",
          value_parser = ["enforce", "log", "off"])]
    pub seccomp: String,

    /// Serve only clients whose uid is in this list (names or numbers,
    /// comma-separated; repeatable). A client passes when its uid or its
    /// gid is allowed; uid 0 always passes. Without --allow-uid and
    /// --allow-gid every client that can open the socket is served.
    /// Refused clients are closed before the handshake and logged.
    #[arg(long = "allow-uid", value_name = "USER[,USER...]", value_delimiter = ',',
          action = ArgAction::Append)]
    pub allow_uid: Vec<String>,

    /// Serve only clients whose gid is in this list (names or numbers,
    /// comma-separated; repeatable); see --allow-uid.
    #[arg(long = "allow-gid", value_name = "GROUP[,GROUP...]", value_delimiter = ',',
          action = ArgAction::Append)]
    pub allow_gid: Vec<String>,

    /// Permissions of the socket reservd creates, in octal. Default: 0600
    /// (only its owner, root, can connect; libvirt gives the socket to
    /// the QEMU user when it starts reservd itself). Not allowed with
    /// socket activation (set SocketMode= in the socket unit).
    #[arg(long = "socket-mode", value_name = "MODE", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,

    /// Group owning the socket reservd creates (name or number), e.g. the
    /// group QEMU runs as, with --socket-mode 0660. Not allowed with
    /// socket activation (set SocketGroup= in the socket unit).
    #[arg(long = "socket-group", value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Serve reservd's metrics (Prometheus' text format) on this UNIX
    /// socket: a client connects and reads them until EOF (reservdctl
    /// metrics). Created like the main socket, mode 0600; --allow-uid and
    /// --allow-gid apply to it too. Must be absolute.
    #[arg(long = "metrics-socket", value_name = "PATH")]
    pub metrics_socket: Option<PathBuf>,

    /// Write reservd's metrics (Prometheus' text format) to this file every
    /// --metrics-interval seconds, for node_exporter's textfile collector
    /// (a *.prom file in its directory). Replaced at once (PATH.tmp renamed
    /// over it), mode 0644, removed when reservd stops; written after
    /// privileges are dropped.
    #[arg(long = "metrics-file", value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,

    /// How often --metrics-file is written, in seconds.
    #[arg(long = "metrics-interval", value_name = "SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub metrics_interval: u32,

    /// Accepted for compatibility with qemu-pr-helper and ignored.
    #[arg(hide = true, value_name = "FILE")]
    pub ignored: Vec<String>,
}
