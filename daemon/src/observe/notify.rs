//! systemd's service notifications (sd_notify(3)): readiness and the
//! status line of a Type=notify service, and the watchdog's keep-alives,
//! which the event loop sends as it turns.

use std::path::Path;
use std::time::Duration;

/// Tell systemd the service is ready, when started as Type=notify, with
/// a status line for `systemctl status`.
pub fn notify_ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// Send `message` (newline-separated `KEY=value` assignments) to systemd's
/// notification socket, if there is one.
pub fn notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(abs) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs)
            .and_then(|a| sock.send_to_addr(message.as_bytes(), &a))
    } else {
        sock.send_to(message.as_bytes(), Path::new(&path))
    };
    if let Err(e) = r {
        log::warn!("cannot notify systemd: {e}");
    }
}

/// How often the event loop sends systemd's watchdog keep-alive: half of
/// `WATCHDOG_USEC`, if systemd set it for this process (`WATCHDOG_PID`
/// unset or this process's pid), as sd_watchdog_enabled(3) reads them.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_of(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_of(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if pid.is_some_and(|p| p.trim().parse::<u32>().ok() != Some(me)) {
        return None;
    }
    Some(Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    use super::watchdog_interval_of;
    use std::time::Duration;

    #[test]
    fn watchdog_interval_is_half_of_systemds_for_this_process_only() {
        assert_eq!(
            watchdog_interval_of(Some("3000000"), None, 42),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            watchdog_interval_of(Some("3000000"), Some("42"), 42),
            Some(Duration::from_millis(1500))
        );
        // Meant for another process (the one before a fork), absent, zero or garbage.
        assert_eq!(watchdog_interval_of(Some("3000000"), Some("41"), 42), None);
        assert_eq!(watchdog_interval_of(None, Some("42"), 42), None);
        assert_eq!(watchdog_interval_of(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval_of(Some("3s"), None, 42), None);
        assert_eq!(watchdog_interval_of(Some("3000000"), Some("x"), 42), None);
    }
}
