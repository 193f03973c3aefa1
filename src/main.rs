//! The reservd daemon. Everything but argument handling is in the library.

use clap::Parser;
use reservd_daemon::cli::Cli;

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
                    eprintln!("reservd: {first}");
                    eprintln!("Try 'reservd --help' for more information.");
                    std::process::exit(1);
                }
            }
        }
    };
    if let Err(e) = reservd_daemon::run(cli) {
        eprintln!("reservd: {e:#}");
        std::process::exit(1);
    }
}
