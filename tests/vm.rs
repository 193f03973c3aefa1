//! End-to-end tests on real SCSI disks with persistent reservations.
//!
//! The host has no SCSI stack, so this test boots Debian's kernel under QEMU
//! with the host's root filesystem (`tests/vm/run-vm.sh`), where LIO and
//! tcm_loop provide a single-path disk and a two-path LUN under
//! dm-multipath. It then runs *this same binary* inside the guest with
//! `--guest GROUP`, which drives reservd as QEMU would and reads the device
//! state back with `sg_persist`.
//!
//! `RELEASE_SCENARIOS` and `RELEASE_GROUPS` run on a Debian trixie or sid
//! userspace instead (`run-vm.sh --release`, a debootstrap root cached in
//! the VM cache), with that release's multipath-tools.
//!
//! Gate: the VM tier runs when the test binary is given `--include-ignored`
//! or `--ignored` (as `scripts/test.sh` does), or RESERVD_VM_TESTS=1; a
//! plain `cargo test` prints that it was skipped, and RESERVD_VM_TESTS=0
//! skips it even with `--include-ignored`.

/// The guest scenarios' checks: a failed one ends the scenario with an
/// error naming the line (defined before the modules, which all use them).
macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!("{} (at line {})", format!($($fmt)+), line!()));
        }
    };
}

macro_rules! check_eq {
    ($a:expr, $b:expr, $($fmt:tt)+) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err(format!("{}: {:?} != {:?} (at line {})", format!($($fmt)+), a, b, line!()));
        }
    }};
}

#[path = "e2e/conformance.rs"]
mod conformance;
#[path = "e2e/flap.rs"]
mod flap;
#[path = "e2e/guest.rs"]
mod guest;
#[path = "e2e/nested.rs"]
mod nested;
#[path = "e2e/ops.rs"]
mod ops;
#[path = "e2e/systemd.rs"]
mod systemd;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Groups of guest scenarios; each boots one VM.
const GROUPS: &[&str] = &[
    "sgio",
    "reference",
    "oracle",
    "robust",
    "qemu",
    "ops",
    "access",
    "package",
    "conformance",
    "flap",
];
/// Groups that need more of the bed than its default (`tests/vm/maps.sh`).
/// A group's entry applies on every release it runs on.
const GROUP_ENV: &[(&str, &[(&str, &str)])] = &[
    (
        "flap",
        &[("RESERVD_VM_MAPS", "2"), ("RESERVD_VM_MAPS_NODE2", "1")],
    ),
    // Two maps driven side by side (tests/e2e/maps.rs).
    ("conformance", &[("RESERVD_VM_MAPS", "2")]),
];
/// Groups that need a run-vm.sh option: systemd as the guest's PID 1
/// (`--systemd`), a guest inside the guest (`--nested`).
const OPTION_GROUPS: &[(&str, &str)] = &[("systemd", "--systemd"), ("nested", "--nested")];
/// Shell scenarios run as they are (tests/vm/scenarios/NAME.sh).
const SHELL_SCENARIOS: &[&str] = &["smoke", "multipath", "libiscsi", "kubevirt", "faultpath"];
/// Shell scenarios on another Debian release's userspace and multipath-tools
/// (`run-vm.sh --release`), as test `vm_NAME_RELEASE`; the groups and
/// scenarios above run on the host's (bookworm, or RESERVD_VM_RELEASE).
const RELEASE_SCENARIOS: &[(&str, &str)] = &[
    ("smoke", "trixie"),
    ("smoke", "sid"),
    ("multipath", "trixie"),
    ("multipath", "sid"),
    ("libiscsi", "trixie"),
    ("libiscsi", "sid"),
    ("kubevirt", "sid"),
];
/// Guest groups run again on another release's root, as test
/// `vm_GROUP_RELEASE` (the conformance table per multipath-tools release).
const RELEASE_GROUPS: &[(&str, &str)] = &[
    ("conformance", "trixie"),
    ("conformance", "sid"),
    ("access", "trixie"),
    ("access", "sid"),
    ("ops", "trixie"),
    ("ops", "sid"),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--guest") {
        let group = args.get(i + 1).map(String::as_str).unwrap_or("");
        std::process::exit(guest::run(group));
    }
    let gate = std::env::var("RESERVD_VM_TESTS");
    let asked = args
        .iter()
        .any(|a| a == "--include-ignored" || a == "--ignored");
    let enabled = gate.as_deref() != Ok("0") && (asked || gate.as_deref() == Ok("1"));
    // Positional words are name filters and `--skip NAME` excludes, as with
    // the standard harness.
    let mut filters: Vec<&String> = Vec::new();
    let mut skips: Vec<&String> = Vec::new();
    let mut words = args.iter().skip(1);
    while let Some(a) = words.next() {
        if a == "--skip" {
            skips.extend(words.next());
        } else if !a.starts_with('-') {
            filters.push(a);
        }
    }
    let selected = |name: &str| {
        (filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
            && !skips.iter().any(|s| name.contains(s.as_str()))
    };
    // (test name, run-vm.sh options, scenario and its arguments)
    let mut runs: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    let exe = std::env::current_exe().expect("current_exe");
    for g in GROUPS {
        let name = format!("vm_{g}");
        if selected(&name) {
            runs.push((
                name,
                Vec::new(),
                vec![exe.display().to_string(), "--guest".into(), g.to_string()],
            ));
        }
    }
    for (g, option) in OPTION_GROUPS {
        let name = format!("vm_{g}");
        if selected(&name) {
            runs.push((
                name,
                vec![option.to_string()],
                vec![exe.display().to_string(), "--guest".into(), g.to_string()],
            ));
        }
    }
    for (g, release) in RELEASE_GROUPS {
        let name = format!("vm_{g}_{release}");
        if selected(&name) {
            runs.push((
                name,
                vec!["--release".into(), release.to_string()],
                vec![exe.display().to_string(), "--guest".into(), g.to_string()],
            ));
        }
    }
    let shell = |s: &str| {
        vec![root()
            .join(format!("tests/vm/scenarios/{s}.sh"))
            .display()
            .to_string()]
    };
    for s in SHELL_SCENARIOS {
        let name = format!("vm_{s}");
        if selected(&name) {
            runs.push((name, Vec::new(), shell(s)));
        }
    }
    for (s, release) in RELEASE_SCENARIOS {
        let name = format!("vm_{s}_{release}");
        if selected(&name) {
            runs.push((
                name,
                vec!["--release".into(), release.to_string()],
                shell(s),
            ));
        }
    }
    if !enabled {
        println!(
            "vm: {} end-to-end test(s) skipped: they boot a VM (run scripts/test.sh, or cargo test --test vm -- --include-ignored)",
            runs.len()
        );
        println!("0 passed, 0 failed, {} skipped", runs.len());
        return;
    }
    let started = Instant::now();
    let (mut passed, mut failed) = (0, 0);
    for (name, options, scenario) in &runs {
        let t = Instant::now();
        if (name == "vm_package" || name == "vm_systemd") && !build_deb() {
            failed += 1;
            println!("test {name} ... FAILED (packaging/build-deb.sh failed)");
            continue;
        }
        if name.starts_with("vm_kubevirt") && !build_image(options) {
            failed += 1;
            println!("test {name} ... FAILED (packaging/build-image.sh failed)");
            continue;
        }
        if name.starts_with("vm_libiscsi") && !build_prshim() {
            failed += 1;
            println!("test {name} ... FAILED (cargo build -p reservd-prshim failed)");
            continue;
        }
        println!("test {name} ... booting the VM");
        let group = name.trim_start_matches("vm_");
        let envs = GROUP_ENV
            .iter()
            .find(|(g, _)| {
                group
                    .strip_prefix(g)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('_'))
            })
            .map_or(&[][..], |(_, e)| e);
        // the flap group runs RESERVD_FLAP_SECS (60) of path failures
        let flap_secs: u64 = std::env::var("RESERVD_FLAP_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60);
        let timeout = if group == "flap" {
            900.max(flap_secs + 600)
        } else {
            900
        };
        let status = Command::new(root().join("tests/vm/run-vm.sh"))
            .args(["--timeout", &timeout.to_string()])
            .args(options)
            .args(scenario)
            .envs(envs.iter().copied())
            .current_dir(root())
            .status();
        match status {
            Ok(s) if s.success() => {
                passed += 1;
                println!("test {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64());
            }
            Ok(s) => {
                failed += 1;
                println!(
                    "test {name} ... FAILED ({s}, {:.1} s)",
                    t.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED (cannot run tests/vm/run-vm.sh: {e})");
            }
        }
    }
    println!(
        "vm: end-to-end tier ran in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The package group runs the .deb's daemon: build it (quick when the
/// release binaries are up to date).
fn build_deb() -> bool {
    Command::new(root().join("packaging/build-deb.sh"))
        .env("RESERVD_LINTIAN", "0")
        .current_dir(root())
        .status()
        .is_ok_and(|s| s.success())
}

/// The kubevirt scenario runs the pr-helper image of the guest's release
/// (`--release NAME` among the run's options, else RESERVD_VM_RELEASE or
/// bookworm), built from
/// the .deb (cached when nothing changed).
fn build_image(options: &[String]) -> bool {
    let suite = options
        .iter()
        .position(|o| o == "--release")
        .and_then(|i| options.get(i + 1))
        .cloned()
        .or_else(|| std::env::var("RESERVD_VM_RELEASE").ok())
        .unwrap_or_else(|| "bookworm".into());
    build_deb()
        && Command::new(root().join("packaging/build-image.sh"))
            .args(["--suite", &suite])
            .current_dir(root())
            .status()
            .is_ok_and(|s| s.success())
}

/// The libiscsi scenario preloads the reservd-prshim library, which no
/// test target builds.
fn build_prshim() -> bool {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--locked", "-p", "reservd-prshim"])
        .current_dir(root())
        .status()
        .is_ok_and(|s| s.success())
}
