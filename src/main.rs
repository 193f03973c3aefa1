//! The reservd daemon. Everything but argument handling is in the library.

use clap::Parser;
use reservd_daemon::start::cli::Cli;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    std::process::exit(0);
                }
                _ => {
                    // One line, then the usual hint, and exit 1 as qemu-pr-helper does.
                    let msg = e.render().to_string();
                    let first = msg.lines().next().unwrap_or("invalid arguments");
                    let first = first.strip_prefix("error: ").unwrap_or(first);
                    let p = error_prefix();
                    eprintln!("{p}reservd: {first}");
                    eprintln!("{p}Try 'reservd --help' for more information.");
                    std::process::exit(1);
                }
            }
        }
    };
    if let Err(e) = reservd_daemon::run(cli) {
        eprintln!("{}reservd: {e:#}", error_prefix());
        std::process::exit(1);
    }
}

/// Under systemd, fatal errors carry the journal's error priority, like the
/// logger's own lines.
fn error_prefix() -> &'static str {
    if reservd_daemon::observe::journal::stderr_is_journal() {
        "<3>"
    } else {
        ""
    }
}
