//! A guest OS sends its PR commands through QEMU to reservd (the `nested`
//! group, `run-vm.sh --nested`): inside the test VM, QEMU boots a minimal
//! Linux guest (Debian's kernel, an initramfs with busybox and sg_persist,
//! tests/vm/nested-init.sh) with `-object pr-manager-helper` pointing at
//! reservd and two `scsi-block` disks: the multipath map and the
//! single-path disk. The guest runs sg_persist; QEMU's SCSI emulation sends
//! each PERSISTENT RESERVE to reservd with the disk's fd; the test reads
//! every path of the map from this level after each step.
//!
//! The nested guest runs under TCG inside TCG: its boot takes about a
//! minute, each sg_persist a few seconds. Commands reach it on its second
//! serial port (a QEMU `pipe` chardev), one line each, answered by their
//! output and `@@END <status>`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use reservd_testkit::qemu::QEMU;
use reservd_testkit::spawn::{wait_for, Output, Proc};

use crate::guest::{
    device_keys, device_reservation, env, log_dir, mp_paths, reservd, Scenario, TestResult,
};

pub fn scenarios() -> Vec<Scenario> {
    vec![(
        "nested_guest_pr_commands_through_qemu_and_reservd",
        nested_guest_pr_commands_through_qemu_and_reservd,
    )]
}

/// Keys the guest registers.
const K1: u64 = 0x6e57_0000_0000_0001;
const K2: u64 = 0x6e57_0000_0000_0002;
const K3: u64 = 0x6e57_0000_0000_0003;
/// What sg_persist calls a type 5 reservation.
const TYPE5: &str = "Write Exclusive, registrants only";

/// The nested guest: its QEMU, the command pipe and the lines it prints.
struct Guest {
    qemu: Proc,
    to_guest: File,
    lines: Receiver<String>,
    dir: PathBuf,
}

impl Guest {
    /// Boot the guest with `disks` (QEMU node name, device) as scsi-block
    /// disks whose PR commands go to reservd on `socket`.
    fn boot(socket: &Path, disks: &[(&str, &Path)]) -> Result<(Guest, Duration), String> {
        let kernel = env("RESERVD_VM_NESTED_KERNEL");
        let initrd = env("RESERVD_VM_NESTED_INITRD");
        let dir = PathBuf::from("/run/reservd-nested");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for end in ["in", "out"] {
            let p = dir.join(format!("cmd.{end}"));
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|e| format!("mkfifo {}: {e}", p.display()))?;
        }
        // Read-write opens never wait for the other end.
        let open = |end: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join(format!("cmd.{end}")))
                .map_err(|e| format!("cmd.{end}: {e}"))
        };
        let to_guest = open("in")?;
        let from_guest = open("out")?;
        let console = log_dir().join("nested-console.log");
        // The kernel's initcalls that cost seconds at this speed and that a
        // guest with a serial console and two SCSI disks does not need.
        let skip = [
            "crypto_kdf108_init",
            "init_kprobe_trace",
            "cubictcp_register",
            "cmos_init",
            "i8042_init",
            "slab_sysfs_init",
            "trace_eval_init",
            "init_clocksource_sysfs",
            "perf_event_sysfs_init",
            "regulator_init",
            "hugetlb_init",
            "init_trace_printk_function_export",
        ];
        let append = format!(
            "console=ttyS0 panic=-1 loglevel=4 mitigations=off no_timer_check \
             cryptomgr.notests acpi=off ipv6.disable=1 initcall_blacklist={} nested_disks={}",
            skip.join(","),
            disks.len()
        );
        let mut cmd = Command::new(QEMU);
        cmd.args(["-M", "pc", "-bios", "/usr/share/qemu/qboot.rom"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "128M"])
            .args(["-kernel", &kernel, "-initrd", &initrd, "-append", &append])
            .args([
                "-chardev",
                &format!("file,id=con,path={}", console.display()),
            ])
            .args(["-serial", "chardev:con"])
            .args([
                "-chardev",
                &format!("pipe,id=cmd,path={}", dir.join("cmd").display()),
            ])
            .args(["-serial", "chardev:cmd"])
            .args([
                "-object",
                &format!("pr-manager-helper,id=pr0,path={}", socket.display()),
            ])
            .args(["-device", "virtio-scsi-pci,id=scsi0"]);
        for (i, (node, dev)) in disks.iter().enumerate() {
            cmd.args([
                "-blockdev",
                &format!(
                    "driver=host_device,filename={},node-name={node},pr-manager=pr0",
                    dev.display()
                ),
            ])
            .args([
                "-device",
                &format!("scsi-block,bus=scsi0.0,drive={node},scsi-id={i},lun=0"),
            ]);
        }
        let t = Instant::now();
        let qemu = Proc::spawn_with(cmd, Output::Log(log_dir().join("nested-qemu.log")))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(from_guest).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut g = Guest {
            qemu,
            to_guest,
            lines,
            dir,
        };
        let ready = g.wait_line("@@READY", Duration::from_secs(400))?;
        check!(
            ready.ends_with(&format!("disks={}", disks.len())),
            "the nested guest found other disks: {ready}"
        );
        let booted = t.elapsed();
        println!(
            "  nested guest ready after {:.1} s ({ready})",
            booted.as_secs_f64()
        );
        Ok((g, booted))
    }

    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(_) => {}
                Err(_) => {
                    let status = self.qemu.try_status();
                    return Err(format!(
                        "no '{prefix}' from the nested guest within {} s (qemu: {status:?}); \
                         see nested-console.log and nested-qemu.log",
                        timeout.as_secs()
                    ));
                }
            }
        }
    }

    /// Send one shell command line; its output lines and exit status.
    fn send(&mut self, line: &str) -> TestResult {
        writeln!(self.to_guest, "{line}").map_err(|e| format!("to the nested guest: {e}"))
    }

    fn finish(&mut self, timeout: Duration) -> Result<(i32, Vec<String>), String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self.lines.recv_timeout(left).map_err(|_| {
                format!(
                    "no end of the command within {} s: {out:?}",
                    timeout.as_secs()
                )
            })?;
            if let Some(rc) = l.strip_prefix("@@END ") {
                return Ok((rc.trim().parse().unwrap_or(-1), out));
            }
            out.push(l);
        }
    }

    /// Run `line` in the guest; Err unless it exits 0.
    fn run(&mut self, line: &str) -> Result<Vec<String>, String> {
        let t = Instant::now();
        self.send(line)?;
        let (rc, out) = self.finish(Duration::from_secs(180))?;
        println!("  guest: {line}  [{:.1} s]", t.elapsed().as_secs_f64());
        for l in &out {
            println!("    | {l}");
        }
        check!(rc == 0, "in the nested guest, `{line}` exited {rc}");
        Ok(out)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = writeln!(self.to_guest, "@@QUIT");
        if self.qemu.wait_timeout(Duration::from_secs(20)).is_none() {
            self.qemu.terminate(Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The keys sg_persist listed, in order.
fn keys_listed(out: &[String]) -> Vec<u64> {
    out.iter()
        .filter_map(|l| l.trim().strip_prefix("0x"))
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect()
}

/// What the map's two paths hold, read from this level (each path is one
/// nexus: a key registered through the map is listed once per path).
fn expect_paths(keys: &[u64], reservation: Option<(u64, &str)>, step: &str) -> TestResult {
    let (p1, p2) = mp_paths();
    for p in [&p1, &p2] {
        check_eq!(
            device_keys(p)?,
            keys.to_vec(),
            "keys on {} after {step}",
            p.display()
        );
        let r = device_reservation(p)?;
        check_eq!(
            r.as_ref().map(|(k, _)| *k),
            reservation.map(|(k, _)| k),
            "reservation on {} after {step}",
            p.display()
        );
        if let (Some((_, got)), Some((_, want))) = (&r, reservation) {
            check!(
                got.ends_with(want),
                "reservation type on {}: {got}",
                p.display()
            );
        }
    }
    Ok(())
}

fn set_path_state(path: &Path, state: &str) -> TestResult {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let f = format!("/sys/block/{name}/device/state");
    std::fs::write(&f, format!("{state}\n")).map_err(|e| format!("{f}: {e}"))
}

fn multipathd_shows(path: &Path, word: &str) -> Result<bool, String> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let out = Command::new("multipathd")
        .args(["show", "paths", "raw", "format", "%d %t %T"])
        .output()
        .map_err(|e| format!("multipathd: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(&name) && l.contains(word)))
}

fn nested_guest_pr_commands_through_qemu_and_reservd() -> TestResult {
    let started = Instant::now();
    let mp = PathBuf::from(env("RESERVD_MP_DEV"));
    let sp = PathBuf::from(env("RESERVD_SP_DEV"));
    let (p1, _) = mp_paths();
    let mut d = reservd("reservd-nested", &["-v"])?;
    let socket = d.socket.clone();
    let (mut g, booted) = Guest::boot(&socket, &[("mp", &mp), ("sp", &sp)])?;
    // Which guest disk is which: the LU's WWID passes through scsi-block.
    let disks = g.run("for d in /sys/block/sd*; do echo ${d##*/} $(cat $d/device/wwid); done")?;
    let find = |wwid: &str| {
        let naa = format!("naa.{}", &wwid[1..]);
        disks
            .iter()
            .find(|l| l.ends_with(&naa))
            .and_then(|l| l.split_whitespace().next())
            .map(|n| format!("/dev/{n}"))
            .ok_or(format!("no guest disk with WWID {naa}: {disks:?}"))
    };
    let gmp = find(&env("RESERVD_MP_WWID"))?;
    let gsp = find(&env("RESERVD_SP_WWID"))?;
    let t_map = Instant::now();

    // --- the map: one I_T nexus for the guest, a registration on every path
    expect_paths(&[], None, "boot")?;
    g.run(&format!(
        "sg_persist -n --out --register --param-sark={K1:#x} {gmp}"
    ))?;
    expect_paths(&[K1, K1], None, "REGISTER")?;
    g.run(&format!(
        "sg_persist -n --out --reserve --param-rk={K1:#x} --prout-type=5 {gmp}"
    ))?;
    expect_paths(&[K1, K1], Some((K1, TYPE5)), "RESERVE")?;
    let out = g.run(&format!("sg_persist -n --in --read-keys {gmp}"))?;
    check_eq!(
        keys_listed(&out),
        vec![K1],
        "READ KEYS in the guest (one nexus)"
    );
    let out = g.run(&format!("sg_persist -n --in --read-full-status {gmp}"))?;
    let keyline = format!("Key={K1:#x}");
    check_eq!(
        out.iter().filter(|l| l.contains(&keyline)).count(),
        1,
        "READ FULL STATUS in the guest lists one registrant: {out:?}"
    );
    check!(
        out.iter().any(|l| l.contains("Reservation holder")),
        "READ FULL STATUS in the guest names no holder: {out:?}"
    );
    expect_paths(&[K1, K1], Some((K1, TYPE5)), "READ FULL STATUS")?;

    // --- reservd restarts while the guest runs: QEMU's next command
    // reconnects (its write on the old connection fails, it connects again).
    let status = d.stop().ok_or("reservd was not running")?;
    check!(status.success(), "reservd exited with {status}");
    let d2 = reservd("reservd-nested", &["-v"])?;
    check_eq!(d2.socket, socket, "socket path of the restarted reservd");
    g.run(&format!(
        "sg_persist -n --out --release --param-rk={K1:#x} --prout-type=5 {gmp}"
    ))?;
    expect_paths(&[K1, K1], None, "RELEASE after reservd restarted")?;
    let log = std::fs::read_to_string(&d2.log).map_err(|e| e.to_string())?;
    check!(
        log.lines()
            .any(|l| l.contains("audit: PR OUT RELEASE") && l.contains(&format!("key={K1:#x}"))),
        "the restarted reservd did not run the RELEASE: {log}"
    );

    // --- a path of the map goes offline during the guest's PR traffic: the
    // guest changes its key meanwhile (REGISTER with a new service action key)
    g.send(&format!(
        "echo @@STEP && \
         sg_persist -n --out --register --param-rk={K1:#x} --param-sark={K2:#x} {gmp} && \
         sg_persist -n --in --read-keys {gmp}"
    ))?;
    g.wait_line("@@STEP", Duration::from_secs(120))?;
    let t_off = Instant::now();
    set_path_state(&p1, "offline")?;
    let offline = g.finish(Duration::from_secs(180));
    let failed_seen = multipathd_shows(&p1, "failed").unwrap_or(false);
    set_path_state(&p1, "running")?;
    let (rc, out) = offline?;
    println!(
        "  guest, path 1 offline while it changes its key ({:.1} s; multipathd showed it failed: {failed_seen}):",
        t_off.elapsed().as_secs_f64()
    );
    for l in &out {
        println!("    | {l}");
    }
    check!(
        rc == 0,
        "the guest's PR commands with a path going offline exited {rc}: {out:?}"
    );
    let listed = keys_listed(&out);
    check_eq!(
        listed.iter().filter(|k| **k == K2).count(),
        1,
        "the guest's new key in its READ KEYS with path 1 offline: {listed:x?}"
    );
    // The offline path's nexus kept the old key: the LU still lists it.
    let stale = listed.contains(&K1);
    // multipathd reinstates the path and registers the map's key on it.
    let t_back = Instant::now();
    let (_, p2) = mp_paths();
    wait_for(
        Duration::from_secs(60),
        "the map's paths do not both carry the new key again",
        || {
            Ok(multipathd_shows(&p1, "active")?
                && device_keys(&p1)? == vec![K2, K2]
                && device_keys(&p2)? == vec![K2, K2])
        },
    )?;
    println!(
        "  path 1 back, both paths registered with the new key after {:.1} s \
         (while it was offline the guest's READ KEYS also listed its old key: {stale})",
        t_back.elapsed().as_secs_f64()
    );
    let out = g.run(&format!(
        "sg_persist -n --in --read-keys {gmp} && \
         sg_persist -n --out --register --param-rk={K2:#x} --param-sark=0 {gmp}"
    ))?;
    check_eq!(
        keys_listed(&out),
        vec![K2],
        "the guest's READ KEYS once the path is back"
    );
    expect_paths(&[], None, "unregister")?;
    let map_took = t_map.elapsed();

    // --- the single-path disk: SG_IO through reservd
    let t_sp = Instant::now();
    g.run(&format!(
        "sg_persist -n --out --register --param-sark={K3:#x} {gsp}"
    ))?;
    check_eq!(device_keys(&sp)?, vec![K3], "single-path disk keys");
    g.run(&format!(
        "sg_persist -n --out --reserve --param-rk={K3:#x} --prout-type=5 {gsp}"
    ))?;
    let r = device_reservation(&sp)?;
    check!(
        r.as_ref()
            .is_some_and(|(k, t)| *k == K3 && t.ends_with(TYPE5)),
        "single-path disk reservation: {r:?}"
    );
    let out = g.run(&format!("sg_persist -n --in --read-full-status {gsp}"))?;
    check!(
        out.iter().any(|l| l.contains(&format!("Key={K3:#x}"))),
        "READ FULL STATUS on the single-path disk: {out:?}"
    );
    g.run(&format!(
        "sg_persist -n --out --release --param-rk={K3:#x} --prout-type=5 {gsp} && \
         sg_persist -n --out --register --param-rk={K3:#x} --param-sark=0 {gsp}"
    ))?;
    check_eq!(
        device_keys(&sp)?,
        Vec::<u64>::new(),
        "single-path disk keys at the end"
    );
    check_eq!(
        device_reservation(&sp)?,
        None,
        "single-path disk reservation at the end"
    );
    drop(g);
    println!(
        "  timings: nested boot {:.1} s, map sequence {:.1} s, single-path disk {:.1} s, whole {:.1} s",
        booted.as_secs_f64(),
        map_took.as_secs_f64(),
        t_sp.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
