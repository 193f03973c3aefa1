//! The metrics socket (`--metrics-socket`), served by the event loop: a
//! client connects, receives the metrics in Prometheus' text format, and
//! reads EOF. It sends nothing; anything it does send is ignored.
//!
//! A client passes the same access control as on the main socket
//! (`--allow-uid`, `--allow-gid`; uid 0 always). The text is rendered in
//! the loop (atomics and a few small maps: tens of microseconds) and
//! written at once; what the socket does not take is written as it drains,
//! so a client that does not read holds no thread. At most
//! [`MAX_PENDING`] such writes are kept: beyond, the oldest is dropped.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener as StdListener;
use std::sync::Arc;

use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::fdpass;
use super::stats::ServerStats;
use crate::sandbox::access::AllowList;

/// Renders the metrics text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Writes left for clients that did not take all of the text at once.
pub const MAX_PENDING: usize = 16;

/// The listener's token.
pub const LISTENER: Token = Token(usize::MAX - 4);
/// Tokens of pending writes: `PENDING_BASE + key`.
const PENDING_BASE: usize = usize::MAX / 2;

/// A client whose text is not all written yet.
struct Pending {
    stream: UnixStream,
    text: Vec<u8>,
    sent: usize,
    /// When it was accepted, to drop the oldest first.
    seq: u64,
}

pub struct MetricsSocket {
    listener: UnixListener,
    render: Render,
    pending: Slab<Pending>,
    seq: u64,
}

/// Whether `token` is one of a pending write's; its key.
pub fn pending_key(token: Token) -> Option<usize> {
    (token.0 >= PENDING_BASE && token.0 < LISTENER.0).then(|| token.0 - PENDING_BASE)
}

impl MetricsSocket {
    /// Serve `listener` (listening) with `render`, registered in `registry`.
    pub fn new(listener: StdListener, render: Render, registry: &Registry) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let mut listener = UnixListener::from_std(listener);
        registry.register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(MetricsSocket {
            listener,
            render,
            pending: Slab::new(),
            seq: 0,
        })
    }

    /// Serve every client waiting in the backlog.
    pub fn accept(&mut self, registry: &Registry, allow: Option<&AllowList>, stats: &ServerStats) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("metrics socket: accept failed: {e}");
                    return;
                }
            };
            let peer = super::peer_cred(&stream);
            if let Some(allow) = allow {
                if !allow.allows(peer.as_ref()) {
                    log::debug!(
                        "metrics socket: refusing {}: not allowed",
                        peer.map_or_else(|| "unknown peer".into(), |p| p.to_string())
                    );
                    continue;
                }
            }
            ServerStats::bump(&stats.metrics_requests);
            let text = (self.render)().into_bytes();
            self.seq += 1;
            let mut p = Pending {
                stream,
                text,
                sent: 0,
                seq: self.seq,
            };
            if write(&mut p) {
                continue;
            }
            if self.pending.len() >= MAX_PENDING {
                let oldest = self
                    .pending
                    .iter()
                    .min_by_key(|(_, p)| p.seq)
                    .map(|(k, _)| k);
                if let Some(k) = oldest {
                    log::debug!("metrics socket: dropping a client that does not read");
                    self.drop_pending(registry, k);
                }
            }
            let entry = self.pending.vacant_entry();
            let token = Token(PENDING_BASE + entry.key());
            if let Err(e) = registry.register(
                &mut SourceFd(&p.stream.as_raw_fd()),
                token,
                Interest::WRITABLE,
            ) {
                log::debug!("metrics socket: cannot watch a client: {e}");
                continue;
            }
            entry.insert(p);
        }
    }

    /// A pending client's socket can take more.
    pub fn writable(&mut self, registry: &Registry, key: usize) {
        let Some(p) = self.pending.get_mut(key) else {
            return;
        };
        if write(p) {
            self.drop_pending(registry, key);
        }
    }

    fn drop_pending(&mut self, registry: &Registry, key: usize) {
        if let Some(p) = self.pending.try_remove(key) {
            let _ = registry.deregister(&mut SourceFd(&p.stream.as_raw_fd()));
        }
    }

    /// Stop serving: the listener and the pending writes are dropped.
    pub fn close(mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.listener);
        let keys: Vec<usize> = self.pending.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.drop_pending(registry, k);
        }
    }
}

/// Write what the socket takes; true when done (all written, or the
/// client is gone): the stream is then dropped, which is the client's EOF.
fn write(p: &mut Pending) -> bool {
    while p.sent < p.text.len() {
        match fdpass::send(p.stream.as_fd(), &p.text[p.sent..]) {
            Ok(n) => p.sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("metrics socket: write failed: {e}");
                return true;
            }
        }
    }
    true
}
