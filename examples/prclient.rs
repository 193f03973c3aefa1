//! Send one PR command to reservd (or qemu-pr-helper) the way QEMU does,
//! and print the answer on one line:
//! `status 0xSS sense <hex, empty unless CHECK CONDITION> data <hex>`.
//!
//! ```text
//! prclient SOCKET DEVICE in SA [ALLOC]            PR IN, service action SA
//! prclient SOCKET DEVICE out SA TYPE RK SARK [FLAGS]
//!                                                 PR OUT, 24-byte list
//! prclient SOCKET DEVICE raw CDB [PARAMS]         any CDB and parameter list (hex)
//! prclient SOCKET DEVICE cleanup                  CLEANUP (feature 1, opcode 0xFF)
//! ```
//! Numbers take a 0x prefix for hex. PR IN opens DEVICE read-only, the
//! others read-write.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use reservd_client::client::Client;
use reservd_daemon::cdb::{PrInCdb, PrOutCdb};

fn num(s: &str) -> u64 {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.unwrap_or_else(|_| fail(&format!("not a number: {s}")))
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or_else(|_| fail("bad hex")))
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fail(msg: &str) -> ! {
    eprintln!("prclient: {msg}");
    std::process::exit(2)
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 3 {
        fail("usage: prclient SOCKET DEVICE in|out|raw|cleanup ARGS...");
    }
    let arg = |i: usize| {
        a.get(i)
            .map(String::as_str)
            .unwrap_or_else(|| fail("missing argument"))
    };
    let (cdb, params, write, features): (Vec<u8>, Vec<u8>, bool, u32) = match arg(2) {
        "in" => {
            let alloc = a.get(4).map_or(8192, |s| num(s)) as u16;
            let c = PrInCdb {
                service_action: num(arg(3)) as u8,
                allocation_length: alloc,
            };
            (c.encode().to_vec(), vec![], false, 0)
        }
        "out" => {
            let mut p = vec![0u8; 24];
            p[..8].copy_from_slice(&num(arg(5)).to_be_bytes());
            p[8..16].copy_from_slice(&num(arg(6)).to_be_bytes());
            p[20] = a.get(7).map_or(0, |s| num(s)) as u8;
            let c = PrOutCdb {
                service_action: num(arg(3)) as u8,
                scope: 0,
                pr_type: num(arg(4)) as u8,
                parameter_list_length: 24,
            };
            (c.encode().to_vec(), p, true, 0)
        }
        "raw" => {
            let c = hex(arg(3));
            let p = a.get(4).map(|s| hex(s)).unwrap_or_default();
            let w = c.first() != Some(&0x5e);
            (c, p, w, 0)
        }
        "cleanup" => (vec![0xff], vec![], true, 1),
        other => fail(&format!("unknown command {other}")),
    };
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(arg(1))
        .unwrap_or_else(|e| fail(&format!("{}: {e}", arg(1))));
    let stream = UnixStream::connect(Path::new(arg(0)))
        .unwrap_or_else(|e| fail(&format!("{}: {e}", arg(0))));
    let mut client =
        Client::handshake(stream, features).unwrap_or_else(|e| fail(&format!("handshake: {e}")));
    let r = client
        .execute(&cdb, dev.as_fd(), &params)
        .unwrap_or_else(|e| fail(&format!("no answer ({e})")));
    let sense = if r.status == 0x02 {
        to_hex(&r.sense[..18])
    } else {
        String::new()
    };
    println!(
        "status 0x{:02x} sense {} data {}",
        r.status,
        sense,
        to_hex(&r.data)
    );
}
