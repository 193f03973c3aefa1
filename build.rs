//! Generates reservd(8), reservdctl(8) and shell completions from the
//! command-line definitions, into OUT_DIR and `target/<profile>/generated/`.

use std::path::PathBuf;

#[path = "daemon/src/start/cli.rs"]
mod cli;

#[path = "src/bin/reservdctl/cli.rs"]
mod ctl_cli;

fn main() -> std::io::Result<()> {
    use clap::CommandFactory;
    println!("cargo:rerun-if-changed=daemon/src/start/cli.rs");
    println!("cargo:rerun-if-changed=src/bin/reservdctl/cli.rs");
    println!("cargo:rerun-if-changed=build.rs");
    // multipath-tools' libraries log through vsyslog: reservd's own
    // definition takes their messages into its log (daemon's mpath_log).
    for symbol in ["vsyslog", "__vsyslog_chk"] {
        println!("cargo:rustc-link-arg-bin=reservd=-Wl,--export-dynamic-symbol={symbol}");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    // OUT_DIR is target/<profile>/build/reservd-<hash>/out.
    let profile_dir = out
        .ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| out.clone());
    let gen = profile_dir.join("generated");
    std::fs::create_dir_all(gen.join("completions"))?;

    let cmd = cli::Cli::command().version(env!("CARGO_PKG_VERSION"));
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("System Administration");
    let mut page = Vec::new();
    man.render(&mut page)?;
    std::fs::write(gen.join("reservd.8"), &page)?;
    std::fs::write(out.join("reservd.8"), &page)?;

    let ctl = ctl_cli::Cli::command().version(env!("CARGO_PKG_VERSION"));
    let mut page = Vec::new();
    clap_mangen::Man::new(ctl.clone())
        .section("8")
        .manual("System Administration")
        .render(&mut page)?;
    std::fs::write(gen.join("reservdctl.8"), &page)?;
    // The page lists its subcommands as reservdctl-NAME(8): one page each.
    for sub in ctl.get_subcommands().filter(|s| s.get_name() != "help") {
        let name: &'static str = format!("reservdctl-{}", sub.get_name()).leak();
        let mut page = Vec::new();
        let bin: &'static str = format!("reservdctl {}", sub.get_name()).leak();
        clap_mangen::Man::new(sub.clone().name(name).bin_name(bin))
            .section("8")
            .manual("System Administration")
            .render(&mut page)?;
        std::fs::write(gen.join(format!("{name}.8")), &page)?;
    }

    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "reservd", gen.join("completions"))?;
        clap_complete::generate_to(
            shell,
            &mut ctl.clone(),
            "reservdctl",
            gen.join("completions"),
        )?;
    }
    Ok(())
}
