//! reservdctl against a server running in this process on the in-memory
//! SPC-4 target (a temporary file stands for the disk): what it prints, as
//! text and as JSON (key order and value formats are what scripts read),
//! and its exit status.

use std::path::Path;
use std::sync::Arc;

use reservd_proto::cdb::prout_sa;
use reservd_proto::params::ProutParams;
use reservd_proto::wire::FEATURE_CLEANUP;
use reservd_testkit::disks::Disk;
use reservd_testkit::emulated::Emulated;
use reservd_testkit::frames::cdb_out;
use reservd_testkit::server::{assert_good, test_config, TestServer};
use reservd_testkit::spawn::run_to_end;

/// The tool under test.
const RESERVDCTL: &str = env!("CARGO_BIN_EXE_reservdctl");

/// Fixed-format sense of ILLEGAL REQUEST, INVALID FIELD IN CDB (18 bytes).
const INVALID_FIELD_SENSE: &str = "700005000000000a00000000240000000000";

/// Run reservdctl on `server`'s socket: (exit status, stdout, stderr).
fn ctl(server: &TestServer, args: &[&str]) -> (i32, String, String) {
    let sock = server.path.to_str().unwrap();
    let mut all = vec!["-k", sock];
    all.extend_from_slice(args);
    let (status, out, err) = run_to_end(RESERVDCTL, &all);
    (status.code().expect("an exit status"), out, err)
}

fn disk_arg(d: &Disk) -> &str {
    d.path.to_str().unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 18 bytes of zeros, as `"sense"` shows GOOD's sense.
fn no_sense() -> String {
    "0".repeat(36)
}

#[test]
fn prin_as_text_and_json() {
    let (server, _emu) = TestServer::emulated();
    let disk = Disk::new();
    let d = disk_arg(&disk);
    // Nexus 1 (the first connection) registers and reserves.
    let mut c = server.client();
    let register = ProutParams {
        sa_key: 0x1234,
        ..Default::default()
    };
    let reserve = ProutParams {
        key: 0x1234,
        ..Default::default()
    };
    assert_good(
        &c.execute(
            &cdb_out(prout_sa::REGISTER, 0, 24),
            disk.fd(),
            &register.encode(),
        )
        .unwrap(),
    );
    assert_good(
        &c.execute(
            &cdb_out(prout_sa::RESERVE, 5, 24),
            disk.fd(),
            &reserve.encode(),
        )
        .unwrap(),
    );

    let (code, out, _) = ctl(&server, &["in", d, "read-keys"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "  PR generation=0x1, 1 registered reservation key(s) follow:\n    0x1234\n"
    );
    let (code, out, _) = ctl(&server, &["--json", "in", d, "read-keys"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!(
            "{{\"status\":0,\"status_text\":\"GOOD\",\"sense\":\"{}\",\"result\":\
             {{\"generation\":1,\"keys\":[\"0x1234\"],\"truncated\":false}}}}\n",
            no_sense()
        )
    );
    // Cut to the allocation length: the keys that fit, and "truncated".
    let (_, out, _) = ctl(
        &server,
        &["--json", "in", d, "read-keys", "--alloc-len", "8"],
    );
    assert!(
        out.contains("\"result\":{\"generation\":1,\"keys\":[],\"truncated\":true}}"),
        "{out}"
    );

    let (_, out, _) = ctl(&server, &["--json", "in", d, "read-reservation"]);
    assert!(
        out.ends_with(
            "\"result\":{\"generation\":1,\"reservation\":{\"key\":\"0x1234\",\"scope\":0,\"type\":5}}}\n"
        ),
        "{out}"
    );
    let (_, out, _) = ctl(&server, &["in", d, "read-reservation"]);
    assert_eq!(
        out,
        "  PR generation=0x1, Reservation follows:\n    Key=0x1234\n    scope: LU_SCOPE,  type: \
         Write Exclusive, registrants only\n"
    );

    let (_, out, _) = ctl(&server, &["--json", "in", d, "report-capabilities"]);
    assert!(
        out.ends_with(
            "\"result\":{\"crh\":true,\"sip_c\":true,\"atp_c\":true,\"ptpl_c\":true,\"tmv\":true,\
             \"allow_commands\":1,\"ptpl_a\":false,\"type_mask\":59905}}\n"
        ),
        "{out}"
    );

    let tid = hex(&Emulated::initiator_transport_id(1).encode());
    let (_, out, _) = ctl(&server, &["--json", "in", d, "read-full-status"]);
    assert!(
        out.ends_with(&format!(
            "\"result\":{{\"generation\":1,\"descriptors\":[{{\"key\":\"0x1234\",\"all_tg_pt\":false,\
             \"holder\":true,\"scope\":0,\"type\":5,\"relative_target_port\":1,\
             \"transport_id\":\"{tid}\"}}]}}}}\n"
        )),
        "{out}"
    );
    let (_, out, _) = ctl(&server, &["in", d, "read-full-status"]);
    assert!(
        out.contains(
            "<< Reservation holder >> scope: LU_SCOPE, type: Write Exclusive, registrants only"
        ),
        "{out}"
    );
    assert!(
        out.contains("iSCSI name iqn.2026-11.org.reservd:nexus-1"),
        "{out}"
    );
}

#[test]
fn refusals_set_the_exit_status() {
    let (server, _emu) = TestServer::emulated();
    let disk = Disk::new();
    let d = disk_arg(&disk);
    assert_eq!(ctl(&server, &["out", d, "register", "--sa-key", "7"]).0, 0);
    // Another connection, another nexus: not registered.
    let (code, out, _) = ctl(&server, &["out", d, "reserve", "--key", "9", "--type", "5"]);
    assert_eq!((code, out.as_str()), (3, "RESERVATION CONFLICT\n"));
    let (code, out, _) = ctl(
        &server,
        &["--json", "out", d, "reserve", "--key", "9", "--type", "5"],
    );
    assert_eq!(code, 3);
    assert_eq!(
        out,
        format!(
            "{{\"status\":24,\"status_text\":\"RESERVATION CONFLICT\",\"sense\":\"{}\",\"result\":null}}\n",
            no_sense()
        )
    );
    // An invalid type: CHECK CONDITION.
    let (code, out, _) = ctl(&server, &["out", d, "reserve", "--key", "7", "--type", "2"]);
    assert_eq!(
        (code, out.as_str()),
        (
            2,
            "CHECK CONDITION, sense key 0x5 ASC 0x24 ASCQ 0x00 (invalid field in CDB)\n"
        )
    );
    let (code, out, _) = ctl(
        &server,
        &["--json", "out", d, "reserve", "--key", "7", "--type", "2"],
    );
    assert_eq!(code, 2);
    assert_eq!(
        out,
        format!(
            "{{\"status\":2,\"status_text\":\"CHECK CONDITION, sense key 0x5 ASC 0x24 ASCQ 0x00 \
             (invalid field in CDB)\",\"sense\":\"{INVALID_FIELD_SENSE}\",\"result\":null}}\n"
        )
    );
}

#[test]
fn raw_as_text_and_json() {
    let (server, _emu) = TestServer::emulated();
    let disk = Disk::new();
    let d = disk_arg(&disk);
    let (code, out, _) = ctl(&server, &["raw", d, "--cdb", "5e00 0000 0000 0020 0000"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!(
            "status 0x00 GOOD\nsense {}\ndata 0000000000000000\n",
            "0".repeat(192)
        )
    );
    let (code, out, _) = ctl(
        &server,
        &["--json", "raw", d, "--cdb", "5e000000000000200000"],
    );
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!(
            "{{\"status\":0,\"sense\":\"{}\",\"data\":\"0000000000000000\"}}\n",
            "0".repeat(192)
        )
    );
    // A PR OUT with its parameter list; an unknown service action.
    let list = format!("{:048x}", 0x5u128 << 64);
    let (code, out, _) = ctl(
        &server,
        &[
            "--json",
            "raw",
            d,
            "--cdb",
            "5f1f0000000000001800",
            "--data",
            &list,
        ],
    );
    assert_eq!(code, 2);
    assert!(
        out.starts_with(&format!("{{\"status\":2,\"sense\":\"{INVALID_FIELD_SENSE}")),
        "{out}"
    );
}

/// Hex that is not: a usage error (exit status 1, one line), whatever the
/// characters; nothing is sent.
#[test]
fn raw_refuses_what_is_not_hex() {
    let (server, _emu) = TestServer::emulated();
    let disk = Disk::new();
    let d = disk_arg(&disk);
    for (option, bad, why) in [
        ("--cdb", "aé", "is not hex"),
        ("--cdb", "aéb", "is not hex"),
        ("--cdb", "éa5e", "is not hex"),
        ("--cdb", "5e0g", "is not hex"),
        ("--cdb", "5e0", "odd number of hex digits"),
        ("--data", "00ü0", "is not hex"),
    ] {
        let mut args = vec!["raw", d, "--cdb", "5e000000000000200000"];
        if option == "--cdb" {
            args[3] = bad;
        } else {
            args.extend(["--data", bad]);
        }
        let (code, out, err) = ctl(&server, &args);
        assert_eq!((code, out.as_str()), (1, ""), "{bad}: {err}");
        assert_eq!(
            err,
            format!(
                "reservdctl: {option}: {}\n",
                if why == "is not hex" {
                    format!("'{bad}' is not hex")
                } else {
                    format!("odd number of hex digits in '{bad}'")
                }
            ),
        );
    }
    // White space between the digits is fine.
    assert_eq!(
        ctl(&server, &["raw", d, "--cdb", " 5e 00 0000 0000 0020 0000 "]).0,
        0
    );
    server.assert_serves();
}

#[test]
fn cleanup_needs_the_feature() {
    // Offered: the emulated target has nothing to undo, GOOD.
    let config = reservd_daemon::server::Config {
        features: FEATURE_CLEANUP,
        ..test_config()
    };
    let server = TestServer::start(Arc::new(Emulated::new()), config);
    let disk = Disk::new();
    let d = disk_arg(&disk);
    assert_eq!(
        ctl(&server, &["cleanup", d]),
        (0, String::new(), String::new())
    );
    let (code, out, _) = ctl(&server, &["--json", "cleanup", d]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!(
            "{{\"status\":0,\"status_text\":\"GOOD\",\"sense\":\"{}\",\"result\":null}}\n",
            no_sense()
        )
    );
    // Not offered: an error, and no request.
    let (plain, _emu) = TestServer::emulated();
    let (code, out, err) = ctl(&plain, &["cleanup", d]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.contains("does not offer") && err.contains("--enable-cleanup"),
        "{err}"
    );
    plain.assert_serves();
}

#[test]
fn unusable_socket_is_exit_status_1() {
    let disk = Disk::new();
    let (status, out, err) = run_to_end(
        RESERVDCTL,
        &[
            "-k",
            "/nonexistent/reservd.sock",
            "in",
            disk_arg(&disk),
            "read-keys",
        ],
    );
    assert_eq!(status.code(), Some(1));
    assert_eq!(out, "");
    assert!(
        err.starts_with("reservdctl: connecting to /nonexistent/reservd.sock"),
        "{err}"
    );
    assert!(Path::new(disk_arg(&disk)).exists());
}
