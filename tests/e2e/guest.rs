//! The guest side of the end-to-end tests: runs inside the VM test bed,
//! where LIO provides real SCSI disks (see tests/vm/README.md for the
//! environment it exports).

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reservd_client::client::Client;
use reservd_proto::cdb::{pr_type, prin_sa, prout_sa, PrInCdb, PrOutCdb};
use reservd_proto::params::ProutParams;
use reservd_proto::prin;
use reservd_proto::sense::{Answer, SenseCode, Status};

pub type TestResult = Result<(), String>;
pub type Scenario = (&'static str, fn() -> TestResult);

#[path = "access.rs"]
mod access;
#[path = "maps.rs"]
mod maps;

/// Run the scenarios of `group`; returns the process exit status.
pub fn run(group: &str) -> i32 {
    let tests: Vec<Scenario> = match group {
        "sgio" => vec![
            ("sgio_register_and_read_keys", sgio_register_and_read_keys),
            ("sgio_every_reservation_type", sgio_every_reservation_type),
            (
                "sgio_capabilities_and_full_status",
                sgio_capabilities_and_full_status,
            ),
            (
                "sgio_truncated_allocation_lengths",
                sgio_truncated_allocation_lengths,
            ),
            (
                "sgio_two_initiators_conflict_preempt_clear",
                sgio_two_initiators_conflict_preempt_clear,
            ),
            ("sgio_as_an_unprivileged_user", sgio_as_an_unprivileged_user),
        ],
        "oracle" => vec![(
            "oracle_emulated_target_answers_as_lio",
            oracle_emulated_target_answers_as_lio,
        )],
        "qemu" => vec![(
            "qemu_connects_and_finds_reservd_again_after_a_restart",
            qemu_connects_through_restarts,
        )],
        "reference" => vec![(
            "reference_same_bytes_as_qemu_pr_helper",
            reference_same_bytes_as_qemu_pr_helper,
        )],
        "robust" => vec![
            ("robust_fd_count_stable", robust_fd_count_stable),
            (
                "robust_client_vanishes_mid_command",
                robust_client_vanishes_mid_command,
            ),
            ("robust_path_offline", robust_path_offline),
            (
                "robust_sigterm_with_commands_in_flight",
                robust_sigterm_with_commands_in_flight,
            ),
        ],
        "package" => vec![(
            "package_socket_activated_on_a_real_disk",
            package_socket_activated_on_a_real_disk,
        )],
        "ops" => crate::ops::scenarios(),
        "access" => access::scenarios(),
        // The group boots with a second map: two maps side by side too.
        "conformance" => {
            let mut v = crate::conformance::scenarios();
            v.push((
                "maps_two_maps_side_by_side",
                maps::maps_two_maps_side_by_side,
            ));
            v
        }
        "flap" => crate::flap::scenarios(),
        "systemd" => crate::systemd::scenarios(),
        "nested" => crate::nested::scenarios(),
        _ => {
            eprintln!("unknown guest group '{group}'");
            return 2;
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in tests {
        let t = Instant::now();
        match f() {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({} ms)", t.elapsed().as_millis());
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED: {e}");
            }
        }
    }
    println!("guest {group}: {passed} passed, {failed} failed");
    i32::from(failed > 0)
}

pub fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: not running in the VM test bed"))
}

/// The two path devices of the two-path LUN: two I_T nexuses.
pub fn mp_paths() -> (PathBuf, PathBuf) {
    let v = env("RESERVD_MP_PATHS");
    let p: Vec<&str> = v.split_whitespace().collect();
    assert!(p.len() == 2, "RESERVD_MP_PATHS must name two paths: {v}");
    (PathBuf::from(p[0]), PathBuf::from(p[1]))
}

pub fn log_dir() -> PathBuf {
    std::env::var("RESERVD_VM_LOGDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir())
}

pub use reservd_testkit::spawn::Daemon;
use reservd_testkit::spawn::Ready;

/// reservd started as libvirt starts it (`-k /run/NAME.sock`), its stderr
/// in the log directory as NAME.log; stopped on drop.
pub fn reservd(name: &str, extra: &[&str]) -> Result<Daemon, String> {
    helper(Path::new(env!("CARGO_BIN_EXE_reservd")), name, extra)
}

/// Another helper binary (the package's reservd, Debian's qemu-pr-helper)
/// started as [`reservd`] is.
pub fn helper(bin: &Path, name: &str, extra: &[&str]) -> Result<Daemon, String> {
    let socket = PathBuf::from(format!("/run/{name}.sock"));
    let log = log_dir().join(format!("{name}.log"));
    Daemon::helper(bin, &socket, &log, extra)
}

fn open(dev: &Path, write: bool) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .open(dev)
        .map_err(|e| format!("opening {}: {e}", dev.display()))
}

/// PR IN through reservd on `dev` (opened read-only, as for a reader).
pub fn pr_in(c: &mut Client, dev: &Path, sa: u8, alloc: u16) -> Result<Answer, String> {
    let f = open(dev, false)?;
    let cdb = PrInCdb {
        service_action: sa,
        allocation_length: alloc,
    }
    .encode();
    c.execute(&cdb, f.as_fd(), &[])
        .map_err(|e| format!("PR IN {sa} on {}: {e}", dev.display()))
}

/// PR OUT through reservd on `dev` (opened read-write, as QEMU does).
pub fn pr_out(
    c: &mut Client,
    dev: &Path,
    sa: u8,
    ty: u8,
    p: &ProutParams,
) -> Result<Answer, String> {
    let f = open(dev, true)?;
    let params = p.encode();
    let cdb = PrOutCdb {
        service_action: sa,
        scope: 0,
        pr_type: ty,
        parameter_list_length: params.len() as u32,
    }
    .encode();
    c.execute(&cdb, f.as_fd(), &params)
        .map_err(|e| format!("PR OUT {sa} on {}: {e}", dev.display()))
}

pub fn keys(k: u64, sa: u64) -> ProutParams {
    ProutParams {
        key: k,
        sa_key: sa,
        ..Default::default()
    }
}

pub fn expect_good(r: &Answer, what: &str) -> TestResult {
    if r.status != Status::GOOD {
        return Err(format!(
            "{what}: {}",
            reservd_client::report::answer_text(r)
        ));
    }
    Ok(())
}

/// Run a command a few times while it answers with a unit attention, as an
/// initiator does; returns the first other answer.
pub fn past_ua(mut f: impl FnMut() -> Result<Answer, String>) -> Result<Answer, String> {
    for _ in 0..4 {
        let r = f()?;
        match r.sense_code() {
            Some(c) if c.key == 0x06 => continue,
            _ => return Ok(r),
        }
    }
    Err("unit attentions kept coming".into())
}

pub fn sg_persist(args: &[&str], dev: &Path) -> Result<String, String> {
    let out = Command::new("sg_persist")
        .args(["-n"])
        .args(args)
        .arg(dev)
        .output()
        .map_err(|e| format!("running sg_persist: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!(
            "sg_persist {args:?} {} failed ({}): {text}{}",
            dev.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(text)
}

/// The registered keys as sg_persist reads them from the device.
pub fn device_keys(dev: &Path) -> Result<Vec<u64>, String> {
    // A pending unit attention makes the first command fail: retry once.
    let text = sg_persist(&["--in", "-k"], dev).or_else(|_| sg_persist(&["--in", "-k"], dev))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("0x"))
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect())
}

/// The reservation as sg_persist reads it: (key, type name) or None.
pub fn device_reservation(dev: &Path) -> Result<Option<(u64, String)>, String> {
    let text = sg_persist(&["--in", "-r"], dev).or_else(|_| sg_persist(&["--in", "-r"], dev))?;
    if text.contains("NO reservation") {
        return Ok(None);
    }
    let key = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Key=0x"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| format!("cannot read the reservation: {text}"))?;
    let ty = text
        .lines()
        .find(|l| l.contains("type:"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    Ok(Some((key, ty)))
}

/// CLEAR everything on a LUN through `dev`, registering first if needed.
pub fn reset_lun(c: &mut Client, dev: &Path) -> TestResult {
    let k = 0x5eed_0000_0000_0001;
    past_ua(|| pr_out(c, dev, prout_sa::REGISTER_AND_IGNORE, 0, &keys(0, k)))?;
    let r = past_ua(|| pr_out(c, dev, prout_sa::CLEAR, 0, &keys(k, 0)))?;
    expect_good(&r, "CLEAR")?;
    check_eq!(device_keys(dev)?, Vec::<u64>::new(), "keys after CLEAR");
    Ok(())
}

fn sgio_register_and_read_keys() -> TestResult {
    let dev = PathBuf::from(env("RESERVD_SP_DEV"));
    let d = reservd("reservd-sgio", &[])?;
    let mut c = d.client()?;
    reset_lun(&mut c, &dev)?;
    let r = past_ua(|| pr_in(&mut c, &dev, prin_sa::READ_KEYS, 8192))?;
    expect_good(&r, "READ KEYS")?;
    let (gen0, k, _) = prin::parse_read_keys(&r.data).map_err(|_| "short READ KEYS")?;
    check!(k.is_empty(), "keys on a cleared LUN: {k:x?}");

    expect_good(
        &pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(0, 0x1111))?,
        "REGISTER",
    )?;
    check_eq!(
        device_keys(&dev)?,
        vec![0x1111],
        "device keys after REGISTER"
    );
    let r = pr_in(&mut c, &dev, prin_sa::READ_KEYS, 8192)?;
    let (gen1, k, _) = prin::parse_read_keys(&r.data).map_err(|_| "short READ KEYS")?;
    check_eq!(k, vec![0x1111], "READ KEYS through reservd");
    check_eq!(gen1, gen0.wrapping_add(1), "generation after REGISTER");

    // REGISTER with a wrong key: conflict, nothing changes.
    let r = pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(0x9999, 0x2222))?;
    check_eq!(r.status.0, 0x18, "REGISTER with a wrong key");
    check_eq!(
        device_keys(&dev)?,
        vec![0x1111],
        "device keys after a refused REGISTER"
    );

    // REGISTER AND IGNORE EXISTING KEY replaces the key.
    expect_good(
        &pr_out(
            &mut c,
            &dev,
            prout_sa::REGISTER_AND_IGNORE,
            0,
            &keys(0, 0x2222),
        )?,
        "REGISTER AND IGNORE",
    )?;
    check_eq!(
        device_keys(&dev)?,
        vec![0x2222],
        "device keys after REGISTER AND IGNORE"
    );

    // Unregister.
    expect_good(
        &pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(0x2222, 0))?,
        "unregister",
    )?;
    check_eq!(
        device_keys(&dev)?,
        Vec::<u64>::new(),
        "device keys after unregister"
    );
    Ok(())
}

fn sgio_every_reservation_type() -> TestResult {
    let dev = PathBuf::from(env("RESERVD_SP_DEV"));
    let d = reservd("reservd-sgio", &[])?;
    let mut c = d.client()?;
    reset_lun(&mut c, &dev)?;
    expect_good(
        &pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(0, 0xabc))?,
        "REGISTER",
    )?;
    for ty in [1u8, 3, 5, 6, 7, 8] {
        expect_good(
            &pr_out(&mut c, &dev, prout_sa::RESERVE, ty, &keys(0xabc, 0))?,
            &format!("RESERVE type {ty}"),
        )?;
        let r = pr_in(&mut c, &dev, prin_sa::READ_RESERVATION, 8192)?;
        expect_good(&r, "READ RESERVATION")?;
        let (_, res) =
            prin::parse_read_reservation(&r.data).map_err(|_| "short READ RESERVATION")?;
        let res = res.ok_or(format!("no reservation after RESERVE type {ty}"))?;
        check_eq!(res.pr_type, ty, "reserved type");
        // All-registrants reservations report key 0.
        let want_key = if pr_type::is_all_registrants(ty) {
            0
        } else {
            0xabc
        };
        check_eq!(res.key, want_key, "reservation key of type {ty}");
        let dev_res = device_reservation(&dev)?
            .ok_or(format!("sg_persist sees no reservation of type {ty}"))?;
        check_eq!(dev_res.0, want_key, "sg_persist reservation key");
        // RELEASE with another type is refused (LIO answers RESERVATION
        // CONFLICT) and leaves the reservation; with the right type it works.
        let other = if ty == 1 { 3 } else { 1 };
        let r = pr_out(&mut c, &dev, prout_sa::RELEASE, other, &keys(0xabc, 0))?;
        check!(r.status.0 != 0, "RELEASE with the wrong type was GOOD");
        check!(
            device_reservation(&dev)?.is_some(),
            "RELEASE with the wrong type released"
        );
        expect_good(
            &pr_out(&mut c, &dev, prout_sa::RELEASE, ty, &keys(0xabc, 0))?,
            "RELEASE",
        )?;
        check_eq!(
            device_reservation(&dev)?,
            None,
            "reservation after RELEASE of type {ty}"
        );
    }
    expect_good(
        &pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(0xabc, 0))?,
        "unregister",
    )?;
    Ok(())
}

fn sgio_capabilities_and_full_status() -> TestResult {
    let dev = PathBuf::from(env("RESERVD_SP_DEV"));
    let d = reservd("reservd-sgio", &[])?;
    let mut c = d.client()?;
    reset_lun(&mut c, &dev)?;
    let r = pr_in(&mut c, &dev, prin_sa::REPORT_CAPABILITIES, 8192)?;
    expect_good(&r, "REPORT CAPABILITIES")?;
    check_eq!(r.data.len(), 8, "REPORT CAPABILITIES length");
    let caps = prin::parse_report_capabilities(&r.data).map_err(|_| "short REPORT CAPABILITIES")?;
    check!(caps.tmv, "type mask not valid: {caps:?}");
    for ty in [1u8, 3, 5, 6, 7, 8] {
        check!(
            caps.type_mask & prin::type_mask_bit(ty) != 0,
            "type {ty} missing from {caps:?}"
        );
    }
    expect_good(
        &pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(0, 0x77))?,
        "REGISTER",
    )?;
    expect_good(
        &pr_out(&mut c, &dev, prout_sa::RESERVE, 5, &keys(0x77, 0))?,
        "RESERVE",
    )?;
    let r = pr_in(&mut c, &dev, prin_sa::READ_FULL_STATUS, 8192)?;
    expect_good(&r, "READ FULL STATUS")?;
    let (_, descs) = prin::parse_read_full_status(&r.data).map_err(|_| "short READ FULL STATUS")?;
    check_eq!(descs.len(), 1, "READ FULL STATUS descriptors");
    check_eq!(descs[0].key, 0x77, "descriptor key");
    check!(
        descs[0].reservation_holder && descs[0].pr_type == 5,
        "descriptor: {:?}",
        descs[0]
    );
    check!(
        !descs[0].transport_id.is_empty(),
        "descriptor without transport id"
    );
    // The same descriptor as sg_persist decodes it.
    let text = sg_persist(&["--in", "-s"], &dev)?;
    check!(
        text.contains("Key=0x77") && text.contains("Reservation holder"),
        "sg_persist -s: {text}"
    );
    reset_lun(&mut c, &dev)
}

fn sgio_truncated_allocation_lengths() -> TestResult {
    let dev = PathBuf::from(env("RESERVD_SP_DEV"));
    let d = reservd("reservd-sgio", &[])?;
    let mut c = d.client()?;
    reset_lun(&mut c, &dev)?;
    expect_good(
        &pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(0, 0x4242))?,
        "REGISTER",
    )?;
    let full = pr_in(&mut c, &dev, prin_sa::READ_KEYS, 8192)?;
    check_eq!(full.data.len(), 16, "READ KEYS with one key");
    // LIO refuses allocation lengths under 8 (INVALID FIELD IN CDB); reservd
    // passes the device's answer through.
    for alloc in [0u16, 4] {
        let r = pr_in(&mut c, &dev, prin_sa::READ_KEYS, alloc)?;
        check_eq!(
            r.sense_code(),
            Some(SenseCode::INVALID_FIELD),
            "READ KEYS with allocation length {alloc}"
        );
        check!(r.data.is_empty(), "data with a CHECK CONDITION");
    }
    for alloc in [8u16, 12, 15] {
        let r = pr_in(&mut c, &dev, prin_sa::READ_KEYS, alloc)?;
        expect_good(&r, "READ KEYS")?;
        check_eq!(
            r.data.len(),
            alloc as usize,
            "answer size for allocation length {alloc}"
        );
        // The header is the device's; LIO zero-fills a key cut by the
        // allocation length.
        check_eq!(
            r.data[..8],
            full.data[..8],
            "header with allocation length {alloc}"
        );
    }
    // The header keeps the full ADDITIONAL LENGTH when no key fits.
    let r = pr_in(&mut c, &dev, prin_sa::READ_KEYS, 8)?;
    check_eq!(
        r.data[4..8],
        [0, 0, 0, 8],
        "ADDITIONAL LENGTH with allocation 8"
    );
    reset_lun(&mut c, &dev)
}

fn sgio_two_initiators_conflict_preempt_clear() -> TestResult {
    // The two paths of the two-path LUN are two I_T nexuses; used directly
    // (not through the map) they are plain SCSI disks for SG_IO.
    let (p1, p2) = mp_paths();
    let d = reservd("reservd-sgio", &[])?;
    let mut c = d.client()?;
    reset_lun(&mut c, &p1)?;
    expect_good(
        &pr_out(&mut c, &p1, prout_sa::REGISTER, 0, &keys(0, 0xa))?,
        "REGISTER on path 1",
    )?;
    expect_good(
        &pr_out(&mut c, &p1, prout_sa::RESERVE, 1, &keys(0xa, 0))?,
        "RESERVE on path 1",
    )?;
    // An unregistered initiator gets RESERVATION CONFLICT.
    let r = pr_out(&mut c, &p2, prout_sa::RESERVE, 1, &keys(0xb, 0))?;
    check_eq!(r.status.0, 0x18, "RESERVE from an unregistered initiator");
    expect_good(
        &pr_out(&mut c, &p2, prout_sa::REGISTER, 0, &keys(0, 0xb))?,
        "REGISTER on path 2",
    )?;
    let mut k = device_keys(&p2)?;
    k.sort();
    check_eq!(k, vec![0xa, 0xb], "keys seen on path 2");
    // A registered non-holder still cannot reserve.
    check_eq!(
        pr_out(&mut c, &p2, prout_sa::RESERVE, 1, &keys(0xb, 0))?
            .status
            .0,
        0x18,
        "RESERVE by a non-holder"
    );
    // PREEMPT takes the reservation and removes path 1's registration.
    expect_good(
        &pr_out(&mut c, &p2, prout_sa::PREEMPT, 3, &keys(0xb, 0xa))?,
        "PREEMPT",
    )?;
    check_eq!(device_keys(&p2)?, vec![0xb], "keys after PREEMPT");
    let res = device_reservation(&p2)?.ok_or("no reservation after PREEMPT")?;
    check_eq!(res.0, 0xb, "holder after PREEMPT");
    // Path 1 hears about it with a unit attention, then sees the new state.
    let r = pr_in(&mut c, &p1, prin_sa::READ_KEYS, 8192)?;
    if r.status.0 == 0x02 {
        check_eq!(
            r.sense_code(),
            Some(SenseCode::REGISTRATIONS_PREEMPTED),
            "unit attention for the preempted initiator"
        );
    }
    let r = past_ua(|| pr_out(&mut c, &p1, prout_sa::RESERVE, 1, &keys(0xa, 0)))?;
    check_eq!(r.status.0, 0x18, "RESERVE by the preempted initiator");
    // Path 1 registers again and preempts back. (PREEMPT AND ABORT cannot
    // be exercised on this target: Linux 6.1's LIO deadlocks in it, waiting
    // in core_tmr_lun_reset for the very work item that runs the command.)
    expect_good(
        &pr_out(&mut c, &p1, prout_sa::REGISTER, 0, &keys(0, 0xc))?,
        "REGISTER again on path 1",
    )?;
    expect_good(
        &pr_out(&mut c, &p1, prout_sa::PREEMPT, 5, &keys(0xc, 0xb))?,
        "PREEMPT by path 1",
    )?;
    check_eq!(device_keys(&p1)?, vec![0xc], "keys after PREEMPT by path 1");
    // CLEAR from the holder removes everything.
    expect_good(
        &past_ua(|| pr_out(&mut c, &p1, prout_sa::CLEAR, 0, &keys(0xc, 0)))?,
        "CLEAR",
    )?;
    check_eq!(device_keys(&p2)?, Vec::<u64>::new(), "keys after CLEAR");
    check_eq!(device_reservation(&p2)?, None, "reservation after CLEAR");
    Ok(())
}

fn fd_count(pid: u32) -> Result<usize, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))
}

/// Wait until reservd's fd count returns to `want` (answers are written
/// before the worker's copy of the client fd is dropped).
fn settle_fds(pid: u32, want: usize) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = fd_count(pid)?;
        if n == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("reservd holds {n} fds, {want} before"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn robust_fd_count_stable() -> TestResult {
    let dev = PathBuf::from(env("RESERVD_SP_DEV"));
    let d = reservd("reservd-robust", &[])?;
    let mut c = d.client()?;
    let _ = past_ua(|| pr_in(&mut c, &dev, prin_sa::READ_KEYS, 8192))?;
    d.wait_multipath_loaded()?;
    let before = fd_count(d.pid())?;
    for i in 0..200u64 {
        let r = pr_in(&mut c, &dev, prin_sa::READ_KEYS, 8192)?;
        expect_good(&r, "READ KEYS")?;
        if i % 50 == 0 {
            expect_good(
                &pr_out(
                    &mut c,
                    &dev,
                    prout_sa::REGISTER_AND_IGNORE,
                    0,
                    &keys(0, 0x100 + i),
                )?,
                "REGISTER",
            )?;
        }
    }
    settle_fds(d.pid(), before)?;
    let _ = std::fs::read_to_string(&d.log);
    reset_lun(&mut c, &dev)
}

fn robust_client_vanishes_mid_command() -> TestResult {
    use reservd_client::client::send_with_fds;
    use std::io::{Read, Write};
    let dev = PathBuf::from(env("RESERVD_SP_DEV"));
    let d = reservd("reservd-robust", &[])?;
    let mut probe = d.client()?;
    let _ = past_ua(|| pr_in(&mut probe, &dev, prin_sa::READ_KEYS, 8192))?;
    d.wait_multipath_loaded()?;
    let before = fd_count(d.pid())?;
    for i in 0..20 {
        let mut s =
            std::os::unix::net::UnixStream::connect(&d.socket).map_err(|e| e.to_string())?;
        let mut hello = [0u8; 4];
        s.read_exact(&mut hello).map_err(|e| e.to_string())?;
        s.write_all(&[0; 4]).map_err(|e| e.to_string())?;
        let f = open(&dev, i % 2 == 0)?;
        let cdb = reservd_proto::cdb::pad16(
            &PrInCdb {
                service_action: prin_sa::READ_KEYS,
                allocation_length: 8192,
            }
            .encode(),
        );
        send_with_fds(s.as_fd(), &cdb, &[f.as_fd()]).map_err(|e| e.to_string())?;
        // Gone before the answer (every other time, in the middle of a PR OUT's parameter list).
        if i % 2 == 1 {
            let cdb = reservd_proto::cdb::pad16(
                &PrOutCdb {
                    service_action: 0,
                    scope: 0,
                    pr_type: 0,
                    parameter_list_length: 24,
                }
                .encode(),
            );
            let _ = send_with_fds(s.as_fd(), &cdb, &[f.as_fd()]);
            let _ = s.write_all(&[0; 10]);
        }
        drop(s);
    }
    // Everyone else is still served, and nothing leaked.
    let r = pr_in(&mut probe, &dev, prin_sa::READ_KEYS, 8192)?;
    expect_good(&r, "READ KEYS after vanishing clients")?;
    settle_fds(d.pid(), before)
}

fn robust_path_offline() -> TestResult {
    let (p1, p2) = mp_paths();
    let name = p1
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("bad path name")?
        .to_string();
    let state = PathBuf::from(format!("/sys/block/{name}/device/state"));
    let d = reservd("reservd-robust", &["--sgio-timeout", "5000"])?;
    let mut c = d.client()?;
    let _ = past_ua(|| pr_in(&mut c, &p1, prin_sa::READ_KEYS, 8192))?;
    let f1 = open(&p1, false)?;
    std::fs::write(&state, "offline\n").map_err(|e| format!("{}: {e}", state.display()))?;
    let result = (|| -> TestResult {
        let t = Instant::now();
        let cdb = PrInCdb {
            service_action: prin_sa::READ_KEYS,
            allocation_length: 8192,
        }
        .encode();
        let r = c
            .execute(&cdb, f1.as_fd(), &[])
            .map_err(|e| format!("PR IN on an offline path: {e}"))?;
        check!(r.status.0 != 0, "GOOD from an offline path");
        check!(
            t.elapsed() < Duration::from_secs(10),
            "the answer took {:?}",
            t.elapsed()
        );
        // The other path, and other clients, are served meanwhile.
        let mut c2 = d.client()?;
        expect_good(
            &past_ua(|| pr_in(&mut c2, &p2, prin_sa::READ_KEYS, 8192))?,
            "READ KEYS on the other path",
        )?;
        Ok(())
    })();
    std::fs::write(&state, "running\n").map_err(|e| format!("{}: {e}", state.display()))?;
    result?;
    expect_good(
        &past_ua(|| pr_in(&mut c, &p1, prin_sa::READ_KEYS, 8192))?,
        "READ KEYS once the path is back",
    )
}

fn robust_sigterm_with_commands_in_flight() -> TestResult {
    let dev = PathBuf::from(env("RESERVD_SP_DEV"));
    let mut d = reservd("reservd-robust", &[])?;
    let socket = d.socket.clone();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (socket, dev, answered) = (socket.clone(), dev.clone(), answered.clone());
            std::thread::spawn(move || -> (u32, u32) {
                let (mut ok, mut closed) = (0, 0);
                let Ok(mut c) = Client::connect(&socket) else {
                    return (0, 1);
                };
                for _ in 0..10_000 {
                    match pr_in(&mut c, &dev, prin_sa::READ_KEYS, 8192) {
                        Ok(_) => {
                            ok += 1;
                            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(_) => {
                            closed += 1;
                            break;
                        }
                    }
                }
                (ok, closed)
            })
        })
        .collect();
    // SIGTERM once every client is being served (the socket exists before
    // reservd has finished starting), so commands are in flight.
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered.load(std::sync::atomic::Ordering::SeqCst) < 16 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    let status = d.stop().ok_or("reservd was not running")?;
    check!(status.success(), "reservd exited with {status} on SIGTERM");
    check!(
        t.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        t.elapsed()
    );
    check!(!socket.exists(), "socket {} left behind", socket.display());
    let mut total = 0;
    for w in workers {
        let (ok, _) = w.join().map_err(|_| "client thread panicked")?;
        total += ok;
    }
    check!(total > 0, "no command was answered before SIGTERM");
    Ok(())
}

/// One step of a command sequence: a CDB (10 bytes) and PR OUT parameters.
pub struct Step {
    pub what: &'static str,
    pub cdb: [u8; 10],
    pub params: Vec<u8>,
}

fn prin_step(what: &'static str, sa: u8, alloc: u16) -> Step {
    Step {
        what,
        cdb: PrInCdb {
            service_action: sa,
            allocation_length: alloc,
        }
        .encode(),
        params: vec![],
    }
}

fn prout_step(what: &'static str, sa: u8, ty: u8, key: u64, sa_key: u64) -> Step {
    let params = keys(key, sa_key).encode();
    let cdb = PrOutCdb {
        service_action: sa,
        scope: 0,
        pr_type: ty,
        parameter_list_length: params.len() as u32,
    }
    .encode();
    Step { what, cdb, params }
}

/// A single-initiator sequence that visits every service action and the
/// usual error answers.
pub fn single_initiator_sequence() -> Vec<Step> {
    let mut invalid_in = PrInCdb {
        service_action: 0,
        allocation_length: 8192,
    }
    .encode();
    invalid_in[1] = 0x07;
    let mut invalid_out = prout_step("PR OUT service action 0x1f", 0, 0, 0x1, 0);
    invalid_out.cdb[1] = 0x1f;
    vec![
        prin_step("READ KEYS", prin_sa::READ_KEYS, 8192),
        prout_step("REGISTER", prout_sa::REGISTER, 0, 0, 0x1),
        prout_step("REGISTER with a wrong key", prout_sa::REGISTER, 0, 0x5, 0x6),
        prin_step("READ KEYS", prin_sa::READ_KEYS, 8192),
        prout_step("RESERVE type 5", prout_sa::RESERVE, 5, 0x1, 0),
        prin_step("READ RESERVATION", prin_sa::READ_RESERVATION, 8192),
        prin_step("READ FULL STATUS", prin_sa::READ_FULL_STATUS, 8192),
        prin_step("REPORT CAPABILITIES", prin_sa::REPORT_CAPABILITIES, 8192),
        prout_step("RELEASE with the wrong type", prout_sa::RELEASE, 6, 0x1, 0),
        prout_step("RELEASE", prout_sa::RELEASE, 5, 0x1, 0),
        prin_step("READ RESERVATION", prin_sa::READ_RESERVATION, 8192),
        prin_step("READ KEYS, allocation 12", prin_sa::READ_KEYS, 12),
        prin_step("READ KEYS, allocation 0", prin_sa::READ_KEYS, 0),
        Step {
            what: "PR IN service action 7",
            cdb: invalid_in,
            params: vec![],
        },
        invalid_out,
        prout_step("RESERVE type 8", prout_sa::RESERVE, 8, 0x1, 0),
        prin_step("READ RESERVATION", prin_sa::READ_RESERVATION, 8192),
        prout_step(
            "REGISTER AND IGNORE",
            prout_sa::REGISTER_AND_IGNORE,
            0,
            0,
            0x2,
        ),
        prin_step("READ FULL STATUS", prin_sa::READ_FULL_STATUS, 8192),
        prout_step("CLEAR with a wrong key", prout_sa::CLEAR, 0, 0x9, 0),
        prout_step("CLEAR", prout_sa::CLEAR, 0, 0x2, 0),
        prin_step("READ KEYS", prin_sa::READ_KEYS, 8192),
    ]
}

/// Replace the generation of PR IN data (READ KEYS, READ RESERVATION,
/// READ FULL STATUS) by its distance from `base`.
pub fn normalize_generation(cdb: &[u8; 10], data: &mut [u8], base: u32) {
    if cdb[0] == 0x5e && (cdb[1] & 0x1f) != prin_sa::REPORT_CAPABILITIES && data.len() >= 4 {
        let g = u32::from_be_bytes(data[..4].try_into().unwrap());
        data[..4].copy_from_slice(&g.wrapping_sub(base).to_be_bytes());
    }
}

/// Run `steps` through the helper at `socket` on `dev`; answers with
/// generations relative to the LUN's generation at the start.
pub fn run_sequence(socket: &Path, dev: &Path, steps: &[Step]) -> Result<Vec<Answer>, String> {
    let mut c =
        Client::connect(socket).map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    let base = {
        let r = past_ua(|| pr_in(&mut c, dev, prin_sa::READ_KEYS, 8192))?;
        expect_good(&r, "READ KEYS")?;
        u32::from_be_bytes(r.data[..4].try_into().unwrap())
    };
    let mut out = Vec::new();
    for s in steps {
        let f = open(dev, true)?;
        let mut r = c
            .execute(&s.cdb, f.as_fd(), &s.params)
            .map_err(|e| format!("{}: {e}", s.what))?;
        normalize_generation(&s.cdb, &mut r.data, base);
        out.push(r);
    }
    Ok(out)
}

fn reference_same_bytes_as_qemu_pr_helper() -> TestResult {
    let dev = PathBuf::from(env("RESERVD_SP_DEV"));
    let ours = reservd("reservd-ref", &[])?;
    let theirs = helper(
        Path::new("/usr/bin/qemu-pr-helper"),
        "qemu-pr-helper-ref",
        &[],
    )?;
    let steps = single_initiator_sequence();
    let mut c = ours.client()?;
    reset_lun(&mut c, &dev)?;
    let a = run_sequence(&ours.socket, &dev, &steps)?;
    reset_lun(&mut c, &dev)?;
    let b = run_sequence(&theirs.socket, &dev, &steps)?;
    reset_lun(&mut c, &dev)?;
    for ((s, x), y) in steps.iter().zip(&a).zip(&b) {
        check_eq!(
            x.status,
            y.status,
            "{}: status (reservd vs qemu-pr-helper)",
            s.what
        );
        check_eq!(
            report_hex(&x.sense),
            report_hex(&y.sense),
            "{}: sense",
            s.what
        );
        check_eq!(report_hex(&x.data), report_hex(&y.data), "{}: data", s.what);
    }
    println!(
        "  {} steps, identical answers from reservd and qemu-pr-helper",
        steps.len()
    );
    Ok(())
}

fn report_hex(b: &[u8]) -> String {
    reservd_client::report::hex(b)
}

/// One step of a two-initiator sequence: which nexus sends it, and what.
struct NexusStep {
    nexus: usize,
    step: Step,
}

fn on(nexus: usize, step: Step) -> NexusStep {
    NexusStep { nexus, step }
}

/// A two-initiator sequence through registration, reservations of two
/// kinds, conflicts, PREEMPT, unit attentions, RELEASE and CLEAR, avoiding
/// the cases where the emulated target knowingly answers otherwise than LIO
/// (listed in daemon/src/backend/emulated.rs).
fn two_initiator_sequence() -> Vec<NexusStep> {
    let (a, b) = (0, 1);
    let mut bad_type = prout_step("RESERVE type 2", prout_sa::RESERVE, 2, 0xa, 0);
    bad_type.what = "RESERVE with an undefined type";
    let mut bad_in = prin_step("PR IN service action 7", 0, 8192);
    bad_in.cdb[1] = 7;
    vec![
        on(a, prin_step("READ KEYS", prin_sa::READ_KEYS, 8192)),
        on(
            a,
            prout_step("A: REGISTER 0xa", prout_sa::REGISTER, 0, 0, 0xa),
        ),
        on(
            b,
            prout_step("B: REGISTER 0xb", prout_sa::REGISTER, 0, 0, 0xb),
        ),
        on(a, prin_step("A: READ KEYS", prin_sa::READ_KEYS, 8192)),
        on(
            a,
            prout_step(
                "A: REGISTER with a wrong key",
                prout_sa::REGISTER,
                0,
                0x77,
                0x78,
            ),
        ),
        on(a, bad_type),
        on(a, bad_in),
        on(
            a,
            prout_step("A: RESERVE type 5", prout_sa::RESERVE, 5, 0xa, 0),
        ),
        on(
            b,
            prin_step("B: READ RESERVATION", prin_sa::READ_RESERVATION, 8192),
        ),
        on(
            b,
            prout_step("B: RESERVE type 5 (conflict)", prout_sa::RESERVE, 5, 0xb, 0),
        ),
        on(
            b,
            prout_step(
                "B: RESERVE with a wrong key",
                prout_sa::RESERVE,
                5,
                0xbad,
                0,
            ),
        ),
        on(
            b,
            prout_step("B: RELEASE as a non-holder", prout_sa::RELEASE, 5, 0xb, 0),
        ),
        on(
            a,
            prin_step("A: READ FULL STATUS", prin_sa::READ_FULL_STATUS, 8192),
        ),
        on(
            a,
            prin_step("A: REPORT CAPABILITIES", prin_sa::REPORT_CAPABILITIES, 8192),
        ),
        on(
            b,
            prout_step("B: PREEMPT 0xa", prout_sa::PREEMPT, 5, 0xb, 0xa),
        ),
        on(
            a,
            prin_step("A: READ KEYS (unit attention)", prin_sa::READ_KEYS, 8192),
        ),
        on(a, prin_step("A: READ KEYS", prin_sa::READ_KEYS, 8192)),
        on(
            a,
            prout_step(
                "A: RESERVE as a non-registrant",
                prout_sa::RESERVE,
                5,
                0xa,
                0,
            ),
        ),
        on(
            a,
            prout_step(
                "A: REGISTER AND IGNORE 0xc",
                prout_sa::REGISTER_AND_IGNORE,
                0,
                0,
                0xc,
            ),
        ),
        on(
            b,
            prin_step("B: READ RESERVATION", prin_sa::READ_RESERVATION, 8192),
        ),
        on(
            a,
            prout_step("A: RESERVE type 5 (conflict)", prout_sa::RESERVE, 5, 0xc, 0),
        ),
        on(b, prout_step("B: RELEASE", prout_sa::RELEASE, 5, 0xb, 0)),
        on(
            a,
            prin_step("A: READ KEYS (unit attention)", prin_sa::READ_KEYS, 8192),
        ),
        on(a, prin_step("A: READ KEYS", prin_sa::READ_KEYS, 8192)),
        on(
            a,
            prout_step("A: RESERVE type 7", prout_sa::RESERVE, 7, 0xc, 0),
        ),
        on(
            b,
            prin_step("B: READ RESERVATION", prin_sa::READ_RESERVATION, 8192),
        ),
        on(
            b,
            prin_step("B: READ FULL STATUS", prin_sa::READ_FULL_STATUS, 8192),
        ),
        on(
            b,
            prout_step(
                "B: RESERVE type 7 as a holder",
                prout_sa::RESERVE,
                7,
                0xb,
                0,
            ),
        ),
        on(
            b,
            prout_step("B: RESERVE type 5 (conflict)", prout_sa::RESERVE, 5, 0xb, 0),
        ),
        on(a, prout_step("A: CLEAR", prout_sa::CLEAR, 0, 0xc, 0)),
        on(
            b,
            prin_step("B: READ KEYS (unit attention)", prin_sa::READ_KEYS, 8192),
        ),
        on(b, prin_step("B: READ KEYS", prin_sa::READ_KEYS, 8192)),
        on(
            b,
            prin_step("B: READ RESERVATION", prin_sa::READ_RESERVATION, 8192),
        ),
        on(
            a,
            prin_step("A: READ KEYS, allocation 8", prin_sa::READ_KEYS, 8),
        ),
    ]
}

/// What is compared of an answer: status, sense code, and PR IN data with
/// the generation relative to the sequence's first answer and READ FULL
/// STATUS reduced to what does not name ports.
#[derive(Debug, PartialEq, Eq)]
struct Comparable {
    status: u8,
    sense: Option<(u8, u8, u8)>,
    data: String,
}

fn comparable(cdb: &[u8; 10], r: &Answer, base: u32) -> Comparable {
    let sense = r.sense_code().map(|c| (c.key, c.asc, c.ascq));
    let mut data = r.data.clone();
    normalize_generation(cdb, &mut data, base);
    let data = if cdb[0] == 0x5e && (cdb[1] & 0x1f) == prin_sa::READ_FULL_STATUS && r.status.0 == 0
    {
        match prin::parse_read_full_status(&data) {
            Ok((g, d)) => format!(
                "generation {g}: {:?}",
                d.iter()
                    .map(|d| (d.key, d.all_tg_pt, d.reservation_holder, d.scope, d.pr_type))
                    .collect::<Vec<_>>()
            ),
            Err(_) => format!("undecodable {}", report_hex(&data)),
        }
    } else {
        report_hex(&data)
    };
    Comparable {
        status: r.status.0,
        sense,
        data,
    }
}

fn oracle_emulated_target_answers_as_lio() -> TestResult {
    use reservd_daemon::backend::{execute, Command as BackendCommand};
    use reservd_testkit::emulated::Emulated;
    // multipathd's path checker sends TEST UNIT READY on both paths, which
    // would take the unit attentions this sequence checks.
    let _ = Command::new("multipathd").arg("shutdown").output();
    std::thread::sleep(Duration::from_millis(500));
    let (p1, p2) = mp_paths();
    let paths = [p1, p2];
    let d = reservd("reservd-oracle", &[])?;
    let mut c = d.client()?;
    reset_lun(&mut c, &paths[0])?;
    // Drain unit attentions left by the reset on both nexuses.
    for p in &paths {
        let _ = past_ua(|| pr_in(&mut c, p, prin_sa::READ_KEYS, 8192))?;
    }
    let emu = Emulated::new();
    let lu = std::env::temp_dir().join("reservd-oracle-lu");
    let lu_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&lu)
        .map_err(|e| e.to_string())?;
    let steps = two_initiator_sequence();
    let (mut lio_base, mut emu_base) = (None, None);
    let mut mismatches = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let f = open(&paths[s.nexus], true)?;
        let lio = c
            .execute(&s.step.cdb, f.as_fd(), &s.step.params)
            .map_err(|e| format!("{}: {e}", s.step.what))?;
        let cdb16 = reservd_proto::cdb::pad16(&s.step.cdb);
        let cmd = BackendCommand {
            nexus: s.nexus as u64 + 1,
            peer: None,
            fd: lu_file.as_fd(),
            cdb: &cdb16,
            params: &s.step.params,
        };
        let ans = execute(&emu, &cmd).map_err(|e| format!("{}: emulated: {e}", s.step.what))?;
        let ours = Answer {
            status: ans.status,
            sense: ans.sense,
            data: {
                let mut d = ans.data;
                d.truncate(u16::from_be_bytes([s.step.cdb[7], s.step.cdb[8]]) as usize);
                if ans.status.0 != 0 {
                    d.clear();
                }
                d
            },
        };
        if i == 0 {
            lio_base = lio
                .data
                .get(..4)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap()));
            emu_base = ours
                .data
                .get(..4)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap()));
        }
        let x = comparable(&s.step.cdb, &lio, lio_base.unwrap_or(0));
        let y = comparable(&s.step.cdb, &ours, emu_base.unwrap_or(0));
        if x != y {
            mismatches.push(format!(
                "  step {i} {}:\n    LIO      {x:?}\n    emulated {y:?}",
                s.step.what
            ));
        }
    }
    let _ = std::fs::remove_file(&lu);
    reset_lun(&mut c, &paths[0])?;
    println!(
        "  {} steps compared, {} differences",
        steps.len(),
        mismatches.len()
    );
    if !mismatches.is_empty() {
        return Err(format!(
            "the emulated target answers otherwise than LIO:\n{}",
            mismatches.join("\n")
        ));
    }
    Ok(())
}

/// Ask QEMU (over QMP) whether its pr-manager-helper object is connected.
fn qemu_reports_connected(socket: &Path, name: &str) -> TestResult {
    use reservd_testkit::qemu::{qemu, Qmp};
    // (a UNIX socket cannot be bound on the 9p log share)
    let qmp = PathBuf::from(format!("/run/{name}.qmp"));
    let _ = std::fs::remove_file(&qmp);
    let mut q = qemu(socket, &qmp);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        q.wait_socket(&qmp);
        let mut m = Qmp::connect(&qmp);
        let answer = m.execute("query-pr-managers");
        let _ = m.execute("quit");
        answer
    }));
    drop(q);
    let answer = result.map_err(|_| "QEMU or its QMP monitor did not come up".to_string())?;
    check_eq!(
        answer,
        r#"{"return": [{"connected": true, "id": "pr0"}]}"#.to_string(),
        "query-pr-managers"
    );
    Ok(())
}

/// QEMU's pr-manager-helper connects to reservd (multipath support active
/// in the guest) and, after reservd restarts on the same socket, a new
/// connection is served. (QEMU reconnects on its next PR command: the
/// `nested` group sends one from a guest OS across a restart.)
fn qemu_connects_through_restarts() -> TestResult {
    let mut d = reservd("reservd-qemu", &["-v"])?;
    // The start-up line comes once the socket exists; the multipath line
    // once libmpathpersist has loaded in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut log = String::new();
    while !log.contains("multipath support: active") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        log = std::fs::read_to_string(&d.log).unwrap_or_default();
    }
    check!(
        log.contains("multipath support: active"),
        "reservd log: {log}"
    );
    qemu_reports_connected(&d.socket, "qemu1")?;
    let socket = d.socket.clone();
    let status = d.stop().ok_or("reservd was not running")?;
    check!(status.success(), "reservd exited with {status}");
    let d2 = reservd("reservd-qemu", &[])?;
    check_eq!(d2.socket, socket, "socket path");
    qemu_reports_connected(&d2.socket, "qemu2")?;
    // And the daemon still answers a real command after QEMU went away.
    let dev = PathBuf::from(env("RESERVD_SP_DEV"));
    let mut c = d2.client()?;
    expect_good(
        &past_ua(|| pr_in(&mut c, &dev, prin_sa::READ_KEYS, 8192))?,
        "READ KEYS",
    )
}

/// With `-u nobody -g nogroup`: CAP_SYS_RAWIO is all SG_IO on a client's
/// fd needs.
fn sgio_as_an_unprivileged_user() -> TestResult {
    let dev = PathBuf::from(env("RESERVD_SP_DEV"));
    let d = reservd("reservd-nobody", &["-u", "nobody", "-g", "nogroup"])?;
    let mut c = d.client()?;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", d.pid())).map_err(|e| e.to_string())?;
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap_or("")
            .to_string()
    };
    check!(
        field("Uid:")
            .split_whitespace()
            .skip(1)
            .all(|u| u == "65534"),
        "{}",
        field("Uid:")
    );
    // Multipath support is active in the test bed: CAP_SYS_ADMIN is kept
    // for the device-mapper ioctls, next to CAP_SYS_RAWIO.
    check_eq!(
        field("CapEff:"),
        "CapEff:\t0000000000220000".to_string(),
        "effective capabilities"
    );
    check_eq!(
        field("CapBnd:"),
        "CapBnd:\t0000000000000000".to_string(),
        "bounding set"
    );
    reset_lun(&mut c, &dev)?;
    expect_good(
        &pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(0, 0x6565))?,
        "REGISTER as nobody",
    )?;
    check_eq!(device_keys(&dev)?, vec![0x6565], "device keys");
    expect_good(
        &pr_out(&mut c, &dev, prout_sa::RESERVE, 5, &keys(0x6565, 0))?,
        "RESERVE as nobody",
    )?;
    let (_, res) =
        prin::parse_read_reservation(&pr_in(&mut c, &dev, prin_sa::READ_RESERVATION, 8192)?.data)
            .map_err(|_| "short READ RESERVATION")?;
    check_eq!(res.map(|r| r.key), Some(0x6565), "reservation");
    reset_lun(&mut c, &dev)
}

/// The packaged daemon, started the way its units start it: systemd's
/// socket activation (`systemd-socket-activate`, the socket unit's
/// ListenStream) running the service unit's ExecStart, serves a client on a
/// real disk. The guest's /usr is the host's, read-only, so the .deb that
/// the host side built is unpacked rather than installed.
fn package_socket_activated_on_a_real_disk() -> TestResult {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deb = std::fs::read_dir(root.join("target/packages"))
        .map_err(|e| format!("target/packages: {e}"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("no .deb in target/packages")?;
    let pkg = PathBuf::from("/tmp/reservd-pkgroot");
    let _ = std::fs::remove_dir_all(&pkg);
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&pkg)
        .output()
        .map_err(|e| e.to_string())?;
    check!(
        out.status.success(),
        "dpkg-deb -x: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = std::fs::read_to_string(pkg.join("lib/systemd/system/reservd.service"))
        .map_err(|e| e.to_string())?;
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .ok_or("no ExecStart")?;
    let mut argv: Vec<String> = exec.split_whitespace().map(String::from).collect();
    // The unit names the installed path; run the unpacked copy of it.
    argv[0] = pkg
        .join(argv[0].trim_start_matches('/'))
        .display()
        .to_string();
    let socket = PathBuf::from("/run/reservd-activated.sock");
    let mut act = Command::new("systemd-socket-activate");
    act.arg("-l").arg(&socket).args(&argv);
    let log = log_dir().join("reservd-activated.log");
    let result = Daemon::start(act, &socket, &log, Ready::Socket).and_then(|d| {
        // The first connection makes systemd-socket-activate exec reservd.
        let mut c = d.client()?;
        let dev = PathBuf::from(env("RESERVD_SP_DEV"));
        reset_lun(&mut c, &dev)?;
        expect_good(
            &pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(0, 0xdeb))?,
            "REGISTER",
        )?;
        check_eq!(device_keys(&dev)?, vec![0xdeb], "device keys");
        reset_lun(&mut c, &dev)
    });
    let _ = std::fs::remove_dir_all(&pkg);
    result
}
