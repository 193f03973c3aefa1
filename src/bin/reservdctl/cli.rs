//! reservdctl's command line. Depends on clap only: the root build.rs
//! includes it to generate reservdctl(8).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "reservdctl",
    version,
    about = "Send SCSI persistent reservation commands through reservd, check \
             reservations on every path of a multipath map, check the set-up",
    after_help = "Exit status: 0 GOOD (status: consistent; check: all good; validate: \
                  passed), 1 usage, connection or other error, 2 CHECK CONDITION, 3 \
                  RESERVATION CONFLICT, 4 any other SCSI status, 5 status: inconsistent paths \
                  (check: problems found; validate: a check failed), 6 validate: refused, the \
                  LU is in use, 130 validate: interrupted (after its cleanup)."
)]
pub struct Cli {
    /// reservd's socket.
    #[arg(
        short = 'k',
        long = "socket",
        global = true,
        default_value = "/var/run/qemu-pr-helper.sock"
    )]
    pub socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// PERSISTENT RESERVE IN.
    In {
        /// Block or SCSI generic device (opened read-only).
        device: PathBuf,
        action: InAction,
        /// Allocation length (0..8192).
        #[arg(long, default_value_t = 8192)]
        alloc_len: u16,
    },
    /// PERSISTENT RESERVE OUT.
    Out {
        /// Block or SCSI generic device (opened read-write).
        device: PathBuf,
        action: OutAction,
        #[command(flatten)]
        p: OutParams,
    },
    /// Keys and reservation as seen through each path of a multipath map,
    /// and whether every usable path carries every key (needs root).
    ///
    /// Each path gets PERSISTENT RESERVE IN (READ KEYS, READ RESERVATION,
    /// READ FULL STATUS) directly with SG_IO; a registration belongs to the
    /// path whose relative target port (VPD page 0x83) it names. The key
    /// checked is the one multipathd holds for the map (getprkey), or every
    /// key registered through a path when multipathd holds none. Offline or
    /// failed paths are listed but not counted. Exit status: 0 consistent,
    /// 5 a usable path lacks a key, 1 error.
    Status {
        /// /dev/mapper/NAME, /dev/dm-N, or a SCSI disk (/dev/sdX; a path of
        /// a map stands for its map).
        device: PathBuf,
        /// Register missing keys again on the paths that lack them
        /// (REGISTER AND IGNORE EXISTING KEY through libmpathpersist on the
        /// map), then check again. With --json: one document with "before",
        /// "repair" and "after", and --yes is needed to repair.
        #[arg(long)]
        repair: bool,
        /// Do not ask before repairing.
        #[arg(long, short = 'y', requires = "repair")]
        yes: bool,
    },
    /// Check a multipath map before it goes live, as a cluster's validation
    /// does, without changing it (needs root and a running reservd, -k).
    ///
    /// With a test key (0x72737664 and 32 random bits), through reservd on
    /// the map as a guest's commands go: REGISTER, then every path must
    /// hold the key and multipathd know it; RESERVE type 5, every path must
    /// read it; RELEASE, every path must read none. With --with-failover,
    /// one path is set offline (sysfs device/state) until multipathd fails
    /// it, the reservation checks run again on the others, and the path
    /// must come back holding the key. The test key is always removed
    /// afterwards (also after a failure, SIGINT or SIGTERM) and the path
    /// brought back. One verdict per check. Refused (nothing sent) when
    /// multipathd holds a key for the map, one of its paths is registered,
    /// or the LU has registrations not named with --expect-key or a
    /// reservation (--force runs anyway and leaves another node's
    /// reservation alone). Exit status: 0 passed, 5 a check failed, 6
    /// refused, 130 interrupted, 1 error.
    Validate {
        /// /dev/mapper/NAME, /dev/dm-N, or a path of the map.
        device: PathBuf,
        /// Run the reservation checks again with one path offline.
        #[arg(long)]
        with_failover: bool,
        /// The path to take offline (e.g. sdb; default: the first usable one).
        #[arg(long, value_name = "NAME", requires = "with_failover")]
        failover_path: Option<String>,
        /// A registration the LU may hold already (another node's);
        /// repeatable.
        #[arg(long = "expect-key", value_name = "KEY", value_parser = parse_u64)]
        expect_key: Vec<u64>,
        /// Run even though the LU has registrations nobody expects or a
        /// reservation (which is left alone: the reservation checks are
        /// skipped).
        #[arg(long)]
        force: bool,
        /// The test key (default: 0x72737664 followed by 32 random bits).
        #[arg(long, value_name = "KEY", value_parser = parse_u64)]
        key: Option<u64>,
        /// How long multipathd may take to fail the path or use it again.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        path_timeout: u64,
    },
    /// Print reservd's metrics, in Prometheus' text format, from its
    /// metrics socket (reservd --metrics-socket). With --json: the samples
    /// as one JSON array of {"name", "labels", "value"}.
    Metrics {
        /// reservd's metrics socket.
        #[arg(
            long = "metrics-socket",
            value_name = "PATH",
            // reservd_client::metrics::DEFAULT_SOCKET (build.rs reads
            // this file without the crate; tests/metrics.rs compares).
            default_value = "/run/reservd/metrics.sock"
        )]
        metrics_socket: PathBuf,
    },
    /// Check the set-up: device-mapper, libmpathpersist, multipathd and its
    /// reservation_key configuration, privileges, reservd's socket.
    ///
    /// Prints one line per check, each problem with its fix. Exit status: 0
    /// when everything is in order, 5 when a problem was found.
    Check,
    /// CLEANUP (the proposed extension, opcode 0xFF, feature bit 1): on a
    /// multipath map, multipathd forgets the map's key and the map's I_T
    /// nexuses are unregistered; on any other device, nothing.
    ///
    /// reservd offers it when started with --enable-cleanup.
    Cleanup {
        /// Block or SCSI generic device (opened read-write).
        device: PathBuf,
    },
    /// Any CDB, given in hex, with optional parameter data in hex.
    Raw {
        device: PathBuf,
        #[arg(long)]
        cdb: String,
        #[arg(long, default_value = "")]
        data: String,
        /// Open the device read-only.
        #[arg(long)]
        read_only: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum InAction {
    ReadKeys,
    ReadReservation,
    ReportCapabilities,
    ReadFullStatus,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutAction {
    Register,
    Reserve,
    Release,
    Clear,
    Preempt,
    PreemptAbort,
    RegisterIgnore,
}

#[derive(Args)]
pub struct OutParams {
    /// RESERVATION KEY (0x-prefixed hex or decimal).
    #[arg(long, default_value = "0", value_parser = parse_u64)]
    pub key: u64,
    /// SERVICE ACTION RESERVATION KEY.
    #[arg(long, default_value = "0", value_parser = parse_u64)]
    pub sa_key: u64,
    /// Reservation type (1, 3, 5, 6, 7, 8).
    #[arg(long = "type", default_value_t = 0)]
    pub pr_type: u8,
    #[arg(long)]
    pub aptpl: bool,
    #[arg(long)]
    pub all_tg_pt: bool,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("invalid number '{s}': {e}"))
}
