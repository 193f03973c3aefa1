//! Detaching (`-d`), and telling the waiting parent of a daemonized
//! reservd that it serves (systemd is told through
//! [`crate::observe::notify`]).
#![allow(unsafe_code)]

use std::fs::File;
use std::io::Write;

use anyhow::Context;

/// The daemon's end of the start-up report to the process that ran it.
pub struct Detached {
    pipe: File,
}

/// What the daemon writes on success; anything else is an error message.
const STARTED: &[u8] = b"OK";

impl Detached {
    /// Start-up is complete: the parent exits 0.
    pub fn ready(mut self) {
        let _ = self.pipe.write_all(STARTED);
    }

    /// Start-up failed: the parent prints `message` and exits 1.
    pub fn failed(mut self, message: &str) {
        let text = if message.as_bytes() == STARTED {
            "start-up failed"
        } else {
            message
        };
        let _ = self.pipe.write_all(text.as_bytes());
    }
}

/// Detach like daemon(3): fork, new session, cwd /, standard streams on
/// /dev/null. Must run before any thread starts.
///
/// Unlike daemon(3), the parent does not exit at once: it waits until the
/// daemon reports through a pipe that start-up is complete ([`Detached`]),
/// then exits 0, or prints the daemon's error and exits 1. A caller that
/// waits for the parent (an init script, libvirt) thus finds the socket
/// ready, and sees start-up errors that happen after the fork.
pub fn daemonize() -> anyhow::Result<Detached> {
    use std::io::Read;
    let (rx, tx) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("failed to daemonize: pipe")?;
    // SAFETY: reservd is single-threaded at this point (no workers yet), so
    // the child may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.context("failed to daemonize")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(tx);
            // The stop signals were blocked for the daemon's signal fd; the
            // waiting parent should still die of them.
            let _ = nix::sys::signal::SigSet::all().thread_unblock();
            let mut report = Vec::new();
            let _ = File::from(rx).read_to_end(&mut report);
            if report == STARTED {
                std::process::exit(0);
            }
            if report.is_empty() {
                eprintln!("reservd: the daemon exited during start-up");
            } else {
                eprintln!("reservd: {}", String::from_utf8_lossy(&report));
            }
            std::process::exit(1);
        }
        nix::unistd::ForkResult::Child => drop(rx),
    }
    let detached = Detached {
        pipe: File::from(tx),
    };
    match detach_child() {
        Ok(()) => Ok(detached),
        Err(e) => {
            detached.failed(&format!("{e:#}"));
            Err(e)
        }
    }
}

/// The daemon(3) steps after the fork, in the child.
fn detach_child() -> anyhow::Result<()> {
    nix::unistd::setsid().context("failed to daemonize: setsid")?;
    std::env::set_current_dir("/").context("failed to daemonize: chdir /")?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("failed to daemonize: opening /dev/null")?;
    nix::unistd::dup2_stdin(&null).context("failed to daemonize: dup2")?;
    nix::unistd::dup2_stdout(&null).context("failed to daemonize: dup2")?;
    nix::unistd::dup2_stderr(&null).context("failed to daemonize: dup2")?;
    Ok(())
}
