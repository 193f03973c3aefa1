//! reservdctl: send persistent reservation commands through a running
//! reservd (or any qemu-pr-helper), exactly as QEMU would, and show the
//! answers.
//!
//! `status` shows a multipath map's keys and reservation as each path sees
//! them and which path lacks which key (`--repair` registers it again);
//! `check` checks the host's set-up; `validate` runs a cluster's storage
//! checks on a map before it goes live; `metrics` prints reservd's metrics.
//!
//! Exit status: 0 GOOD, 1 usage or connection error, 2 CHECK CONDITION,
//! 3 RESERVATION CONFLICT, 4 any other SCSI status; `status`: 0 consistent,
//! 5 a usable path lacks a key; `check`: 0 all good, 5 problems found.

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use reservd_client::client::Client;
use reservd_client::report::{self, PrinJson};
use reservd_proto::cdb::{prin_sa, prout_sa, PrInCdb, PrOutCdb};
use reservd_proto::params::ProutParams;
use reservd_proto::sense::{Answer, Status};
use reservd_proto::wire::{FEATURE_CLEANUP, OP_CLEANUP};
use serde::Serialize;

mod check;
mod cli;
mod status;
mod validate;

use cli::{Cli, Cmd, InAction, OutAction};

/// The bytes `s` spells in hex, two digits a byte, white space ignored;
/// anything else is a usage error naming `option`.
fn parse_hex(option: &str, s: &str) -> anyhow::Result<Vec<u8>> {
    let digits: Vec<u8> = s
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| c.to_digit(16).map(|d| d as u8))
        .collect::<Option<_>>()
        .with_context(|| format!("{option}: '{s}' is not hex"))?;
    if digits.len() % 2 != 0 {
        bail!("{option}: odd number of hex digits in '{s}'");
    }
    Ok(digits.chunks(2).map(|d| (d[0] << 4) | d[1]).collect())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("reservdctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn exchange(
    cli: &Cli,
    device: &PathBuf,
    write: bool,
    cdb: &[u8],
    params: &[u8],
) -> anyhow::Result<Answer> {
    exchange_with(cli, device, write, cdb, params, 0)
}

/// [`exchange`] on a connection that negotiated `features`, which the
/// server must offer.
fn exchange_with(
    cli: &Cli,
    device: &PathBuf,
    write: bool,
    cdb: &[u8],
    params: &[u8],
    features: u32,
) -> anyhow::Result<Answer> {
    let dev = OpenOptions::new()
        .read(true)
        .write(write)
        .open(device)
        .with_context(|| format!("opening {}", device.display()))?;
    let stream = UnixStream::connect(&cli.socket)
        .with_context(|| format!("connecting to {}", cli.socket.display()))?;
    let mut client = Client::negotiate(stream, features)
        .with_context(|| format!("handshake with {}", cli.socket.display()))?;
    if client.server_features & features != features {
        bail!(
            "{} does not offer the features {features:#x} (it offers {:#x}); CLEANUP needs \
             reservd --enable-cleanup",
            cli.socket.display(),
            client.server_features
        );
    }
    client
        .execute(cdb, dev.as_fd(), params)
        .context("exchanging the command (the connection was closed?)")
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let (resp, prin) = match &cli.cmd {
        Cmd::Status {
            device,
            repair,
            yes,
        } => {
            return Ok(ExitCode::from(status::run(
                device, *repair, *yes, cli.json,
            )?))
        }
        Cmd::Check => return Ok(ExitCode::from(check::run(&cli.socket, cli.json))),
        Cmd::Validate {
            device,
            with_failover,
            failover_path,
            expect_key,
            force,
            key,
            path_timeout,
        } => {
            let opts = validate::Asked {
                device,
                with_failover: *with_failover,
                failover_path: failover_path.clone(),
                expected: expect_key.clone(),
                force: *force,
                key: *key,
                path_timeout: std::time::Duration::from_secs(*path_timeout),
            };
            return Ok(ExitCode::from(validate::run(&cli.socket, &opts, cli.json)?));
        }
        Cmd::Metrics { metrics_socket } => {
            let text =
                reservd_client::metrics::fetch(metrics_socket, std::time::Duration::from_secs(10))
                    .with_context(|| {
                        format!(
                            "reading {} (reservd --metrics-socket)",
                            metrics_socket.display()
                        )
                    })?;
            if text.is_empty() {
                bail!(
                    "{} closed the connection without metrics: this user is not allowed \
                     (reservd --allow-uid, --allow-gid)",
                    metrics_socket.display()
                );
            }
            if cli.json {
                let samples = reservd_client::metrics::parse(&text).map_err(anyhow::Error::msg)?;
                println!("{}", reservd_client::metrics::json(&samples));
            } else {
                print!("{text}");
            }
            return Ok(ExitCode::from(0));
        }
        Cmd::In {
            device,
            action,
            alloc_len,
        } => {
            let sa = match action {
                InAction::ReadKeys => prin_sa::READ_KEYS,
                InAction::ReadReservation => prin_sa::READ_RESERVATION,
                InAction::ReportCapabilities => prin_sa::REPORT_CAPABILITIES,
                InAction::ReadFullStatus => prin_sa::READ_FULL_STATUS,
            };
            let cdb = PrInCdb {
                service_action: sa,
                allocation_length: *alloc_len,
            }
            .encode();
            (exchange(cli, device, false, &cdb, &[])?, Some(sa))
        }
        Cmd::Out { device, action, p } => {
            let sa = match action {
                OutAction::Register => prout_sa::REGISTER,
                OutAction::Reserve => prout_sa::RESERVE,
                OutAction::Release => prout_sa::RELEASE,
                OutAction::Clear => prout_sa::CLEAR,
                OutAction::Preempt => prout_sa::PREEMPT,
                OutAction::PreemptAbort => prout_sa::PREEMPT_AND_ABORT,
                OutAction::RegisterIgnore => prout_sa::REGISTER_AND_IGNORE,
            };
            let params = ProutParams {
                key: p.key,
                sa_key: p.sa_key,
                aptpl: p.aptpl,
                all_tg_pt: p.all_tg_pt,
                ..Default::default()
            }
            .encode();
            let cdb = PrOutCdb {
                service_action: sa,
                scope: 0,
                pr_type: p.pr_type,
                parameter_list_length: params.len() as u32,
            }
            .encode();
            (exchange(cli, device, true, &cdb, &params)?, None)
        }
        Cmd::Cleanup { device } => (
            exchange_with(cli, device, true, &[OP_CLEANUP], &[], FEATURE_CLEANUP)?,
            None,
        ),
        Cmd::Raw {
            device,
            cdb,
            data,
            read_only,
        } => {
            let cdb = parse_hex("--cdb", cdb)?;
            if cdb.is_empty() || cdb.len() > 16 {
                bail!("a CDB has 1 to 16 bytes");
            }
            let data = parse_hex("--data", data)?;
            let resp = exchange(cli, device, !read_only, &cdb, &data)?;
            if cli.json {
                /// `raw --json`: the answer as it came, in hex.
                #[derive(Serialize)]
                struct Raw {
                    status: u8,
                    sense: String,
                    data: String,
                }
                print_json(&Raw {
                    status: resp.status.0,
                    sense: report::hex(&resp.sense),
                    data: report::hex(&resp.data),
                });
            } else {
                println!(
                    "status 0x{:02x} {}",
                    resp.status.0,
                    report::answer_text(&resp)
                );
                println!("sense {}", report::hex(&resp.sense));
                println!("data {}", report::hex(&resp.data));
            }
            return Ok(exit_code(resp.status.0));
        }
    };
    if cli.json {
        /// `in`, `out` and `cleanup --json`: the answer, and PR IN data
        /// decoded (null when there is none, or it is truncated).
        #[derive(Serialize)]
        struct Reply {
            status: u8,
            status_text: String,
            /// The fixed-format sense's 18 bytes, in hex.
            sense: String,
            result: Option<PrinJson>,
        }
        let result = match prin {
            Some(sa) if resp.status == Status::GOOD => report::prin_json(sa, &resp.data).ok(),
            _ => None,
        };
        print_json(&Reply {
            status: resp.status.0,
            status_text: report::answer_text(&resp),
            sense: report::hex(&resp.sense[..18]),
            result,
        });
    } else if resp.status != Status::GOOD {
        println!("{}", report::answer_text(&resp));
    } else if let Some(sa) = prin {
        match report::prin_text(sa, &resp.data) {
            Ok(t) => print!("{t}"),
            Err(_) => println!("  truncated data: {}", report::hex(&resp.data)),
        }
    }
    Ok(exit_code(resp.status.0))
}

/// One JSON document on a line of its own.
fn print_json(doc: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string(doc).expect("reservdctl's JSON serializes")
    );
}

fn exit_code(status: u8) -> ExitCode {
    ExitCode::from(match status {
        0x00 => 0,
        0x02 => 2,
        0x18 => 3,
        _ => 4,
    })
}
