//! What the server counts for reservd's metrics (rendered by
//! `observe::metrics`): client connections, and the event loop's rescues.
//! Atomics, bumped where the event happens; none on a command's way.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The server's counters.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted and served (the handshake sent).
    pub accepted: AtomicU64,
    /// Connections closed at accept: the client's credentials are not in
    /// `--allow-uid`/`--allow-gid`.
    pub refused_not_allowed: AtomicU64,
    /// Connections closed at accept: `--max-connections` were open.
    pub refused_limit: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections closed for a protocol violation (malformed frame,
    /// unexpected fds, a frame not finished in time).
    pub protocol_errors: AtomicU64,
    /// Connections closed because the backend had no answer (multipathd
    /// unreachable for CLEANUP, an unusable fd, a command that panicked).
    pub backend_failures: AtomicU64,
    /// Times another thread took the event loop over from a thread that
    /// was running a command (`crew.rs`).
    pub rescues: AtomicU64,
    /// Metrics requests served on the metrics socket.
    pub metrics_requests: AtomicU64,
}

impl ServerStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
