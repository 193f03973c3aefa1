//! The event loop: a mio loop owns the listener, every connection, the
//! signal fd and a waker, and is run by one thread of the crew at a time
//! (`crew.rs`). When a turn of the loop has read a request, its thread runs
//! the device command itself and writes the answer to the (non-blocking)
//! socket; the loop goes on with that thread when the command ends, or with
//! the crew's standby thread if the command takes long. What could not be
//! written, and the end of the command, come back over a channel. Nothing
//! the loop does blocks.

pub mod crew;
pub mod fdpass;
pub mod metrics_socket;
pub mod stats;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener as StdListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::backend::{self, BackendError, Command, Peer, PrBackend};
use metrics_socket::MetricsSocket;
use reservd_proto::wire::{encode_response, Decoder, Event, ProtoError, Request, DATA_SIZE};
use stats::ServerStats;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// How long a client may take to finish a frame it has started.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(60);

/// File descriptors kept for other uses than client connections (listener,
/// poll, waker, signal fd, logging, the device fds of commands in flight
/// are counted apart).
const FD_HEADROOM: u64 = 64;

/// Server limits and options.
#[derive(Clone, Debug)]
pub struct Config {
    /// Feature bits advertised in the handshake.
    pub features: u32,
    /// Connections beyond this are closed at accept.
    pub max_connections: usize,
    /// Most device commands running at once.
    pub max_workers: usize,
    /// On shutdown, how long to wait for commands in flight.
    pub drain_timeout: Duration,
    /// Clients allowed to connect (`--allow-uid`, `--allow-gid`); None
    /// serves every client.
    pub allow: Option<crate::sandbox::access::AllowList>,
    /// A connection that has started a frame (or has not finished its
    /// handshake) and does not complete it within this time is closed.
    /// `None`: no limit. Idle connections between frames are never timed out.
    pub frame_timeout: Option<Duration>,
    /// Send systemd's watchdog keep-alive from the event loop; `None`: no
    /// watchdog. A loop that stops turning stops the keep-alives, and
    /// systemd restarts the service.
    pub watchdog: Option<Watchdog>,
}

/// A keep-alive the event loop sends as it turns.
#[derive(Clone, Copy, Debug)]
pub struct Watchdog {
    /// How often.
    pub interval: Duration,
    /// Sends one (start-up passes systemd's `WATCHDOG=1`).
    pub ping: fn(),
}

impl Default for Config {
    fn default() -> Self {
        Config {
            features: 0,
            max_connections: 4096,
            max_workers: 256,
            drain_timeout: Duration::from_secs(120),
            allow: None,
            frame_timeout: Some(DEFAULT_FRAME_TIMEOUT),
            watchdog: None,
        }
    }
}

/// Stops a running server from another thread (tests, embedders).
#[derive(Clone)]
pub struct ShutdownHandle {
    flag: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// Where a connection is in its life.
enum ConnState {
    /// Reading the handshake, a CDB or a parameter list.
    Reading,
    /// A command is running on a thread of the crew.
    InFlight,
}

struct Conn {
    /// Shared with the thread running this connection's command, which
    /// writes the answer; the fd stays open until both are done with it.
    stream: Arc<UnixStream>,
    /// Unique for the life of the server; guards against reused slab slots.
    id: u64,
    decoder: Decoder,
    /// The fd that came with the CDB being read.
    fd: Option<OwnedFd>,
    state: ConnState,
    out: VecDeque<u8>,
    writable_registered: bool,
    peer: String,
    peer_cred: Option<Peer>,
    /// When the frame being read (or the handshake) started; `None` between
    /// frames and while a command is in flight.
    frame_start: Option<Instant>,
}

struct Completion {
    key: usize,
    id: u64,
    ended: Ended,
}

/// How a command ended.
enum Ended {
    /// The answer was sent, but for `unsent` (the socket was full).
    Answered { unsent: Vec<u8> },
    /// Writing the answer failed: the client is gone.
    WriteFailed(io::Error),
    /// A transport failure of the backend: the connection is closed.
    Failed(BackendError),
}

pub struct Server {
    poll: Poll,
    listener: Option<UnixListener>,
    conns: Slab<Conn>,
    backend: Arc<dyn PrBackend>,
    /// Commands read in this turn of the loop, for the crew to run.
    ready: Vec<crew::Job>,
    /// Shutting down: when the wait for commands in flight ends.
    drain_deadline: Option<Instant>,
    waker: Arc<Waker>,
    done_tx: Sender<Completion>,
    done_rx: Receiver<Completion>,
    shutdown: Arc<AtomicBool>,
    signals: Option<nix::sys::signalfd::SignalFd>,
    config: Config,
    next_id: u64,
    in_flight: usize,
    buf: Vec<u8>,
    refusals: crate::sandbox::access::RefusalLog,
    /// When the next scan for timed-out frames is due.
    next_scan: Option<Instant>,
    /// When the next watchdog keep-alive is due.
    next_ping: Option<Instant>,
    /// What the metrics count.
    stats: Arc<ServerStats>,
    /// The metrics socket, when served.
    metrics: Option<MetricsSocket>,
    /// Test builds only: panic at the first accept (RESERVD_TEST_LOOP_PANIC).
    #[cfg(all(feature = "test-hooks", debug_assertions))]
    panic_on_accept: bool,
}

impl Server {
    pub fn new(
        listener: StdListener,
        backend: Arc<dyn PrBackend>,
        config: Config,
    ) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let mut listener = UnixListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (done_tx, done_rx) = channel();
        Ok(Server {
            poll,
            listener: Some(listener),
            conns: Slab::new(),
            backend,
            ready: Vec::new(),
            drain_deadline: None,
            waker,
            done_tx,
            done_rx,
            shutdown: Arc::new(AtomicBool::new(false)),
            signals: None,
            next_id: 1,
            in_flight: 0,
            buf: vec![0; DATA_SIZE],
            refusals: crate::sandbox::access::RefusalLog::new(),
            next_scan: None,
            next_ping: config.watchdog.map(|_| Instant::now()),
            config,
            stats: Arc::default(),
            metrics: None,
            #[cfg(all(feature = "test-hooks", debug_assertions))]
            panic_on_accept: std::env::var_os("RESERVD_TEST_LOOP_PANIC").is_some(),
        })
    }

    /// The server's counters, for the metrics.
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    /// Serve the metrics `render` makes on `listener` (see
    /// [`metrics_socket`]), until the server shuts down.
    pub fn serve_metrics(
        &mut self,
        listener: StdListener,
        render: metrics_socket::Render,
    ) -> io::Result<()> {
        self.metrics = Some(MetricsSocket::new(listener, render, self.poll.registry())?);
        Ok(())
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            flag: Arc::clone(&self.shutdown),
            waker: Arc::clone(&self.waker),
        }
    }

    /// Stop on SIGTERM, SIGINT or SIGHUP. The caller must have blocked these
    /// signals in every thread (see [`block_stop_signals`]).
    pub fn watch_signals(&mut self) -> io::Result<()> {
        use nix::sys::signalfd::{SfdFlags, SignalFd};
        let sfd = SignalFd::with_flags(
            &stop_signals(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )?;
        self.poll.registry().register(
            &mut SourceFd(&sfd.as_fd().as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        self.signals = Some(sfd);
        Ok(())
    }

    /// Serve until shut down; then finish commands in flight and return.
    /// The calling thread waits while the crew runs the loop.
    pub fn run(self) -> io::Result<()> {
        let max_workers = self.config.max_workers;
        let lp = Turns {
            server: self,
            events: Events::with_capacity(256),
        };
        crew::run(lp, max_workers)?
    }

    /// One turn of the loop: serve until requests are ready to run, or
    /// until shut down and drained.
    fn turn(&mut self, events: &mut Events) -> crew::Turn<io::Result<()>> {
        // Commands that ended while the loop was down, without waiting.
        self.collect_completions();
        loop {
            if !self.ready.is_empty() {
                return crew::Turn::Jobs(std::mem::take(&mut self.ready));
            }
            if self.shutdown.load(Ordering::SeqCst) && self.drain_deadline.is_none() {
                self.start_drain();
            }
            let r = match self.drain_deadline {
                None => {
                    let due = match (self.next_scan, self.next_ping) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let timeout = due.map(|t| t.saturating_duration_since(Instant::now()));
                    let r = self.poll_once(events, timeout);
                    self.expire_frames();
                    self.ping_watchdog();
                    r
                }
                Some(deadline) => {
                    if !self.draining(deadline) {
                        self.finish_drain();
                        return crew::Turn::Done(Ok(()));
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    let r = self.poll_once(events, Some(left.min(Duration::from_millis(200))));
                    self.close_finished();
                    self.ping_watchdog();
                    r
                }
            };
            if let Err(e) = r {
                return crew::Turn::Done(Err(e));
            }
        }
    }

    fn poll_once(&mut self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        match self.poll.poll(events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => self.accept(),
                WAKER => {}
                SIGNALS => self.read_signals(),
                metrics_socket::LISTENER => {
                    if let Some(m) = self.metrics.as_mut() {
                        m.accept(
                            self.poll.registry(),
                            self.config.allow.as_ref(),
                            &self.stats,
                        );
                    }
                }
                t if metrics_socket::pending_key(t).is_some() => {
                    if let (Some(m), Some(k)) =
                        (self.metrics.as_mut(), metrics_socket::pending_key(t))
                    {
                        m.writable(self.poll.registry(), k);
                    }
                }
                Token(key) => {
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        self.on_readable(key);
                    }
                    if ev.is_writable() {
                        self.flush(key);
                        // Reading waited for the answer to be written.
                        if !self.shutdown.load(Ordering::SeqCst) {
                            self.on_readable(key);
                        }
                    }
                }
            }
        }
        self.collect_completions();
        Ok(())
    }

    /// Tell systemd that the loop turns, once per watchdog interval.
    fn ping_watchdog(&mut self) {
        let (Some(w), Some(due)) = (self.config.watchdog, self.next_ping) else {
            return;
        };
        let now = Instant::now();
        if now >= due {
            (w.ping)();
            self.next_ping = Some(now + w.interval);
        }
    }

    /// How often started frames are checked against the frame timeout.
    fn scan_interval(&self) -> Option<Duration> {
        let t = self.config.frame_timeout?;
        Some((t / 10).clamp(Duration::from_millis(10), Duration::from_secs(1)))
    }

    /// Close the connections whose started frame is older than the frame
    /// timeout. Runs at most once per scan interval, and only while some
    /// connection is inside a frame.
    fn expire_frames(&mut self) {
        let (Some(limit), Some(interval)) = (self.config.frame_timeout, self.scan_interval())
        else {
            return;
        };
        // No frame in progress: nothing to scan, and no clock to read.
        let Some(due) = self.next_scan else {
            return;
        };
        let now = Instant::now();
        if now < due {
            return;
        }
        let mut any = false;
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.frame_start.is_some_and(|s| {
                    any = true;
                    now.duration_since(s) >= limit
                })
            })
            .map(|(k, _)| k)
            .collect();
        for k in expired {
            let c = &self.conns[k];
            log::warn!(
                "connection {} ({}): frame not completed within {} s; closing",
                c.id,
                c.peer,
                limit.as_secs_f64()
            );
            ServerStats::bump(&self.stats.protocol_errors);
            self.close(k, None);
        }
        self.next_scan = any.then(|| now + interval);
    }

    /// A connection entered a frame: make sure a scan is scheduled.
    fn frame_started(&mut self, key: usize) {
        let Some(interval) = self.scan_interval() else {
            return;
        };
        if let Some(c) = self.conns.get_mut(key) {
            if c.frame_start.is_none() {
                let now = Instant::now();
                c.frame_start = Some(now);
                if self.next_scan.is_none() {
                    self.next_scan = Some(now + interval);
                }
            }
        }
    }

    /// Stop accepting, close idle connections and start waiting for the
    /// commands in flight.
    fn start_drain(&mut self) {
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        if let Some(m) = self.metrics.take() {
            m.close(self.poll.registry());
        }
        self.drain_deadline = Some(Instant::now() + self.config.drain_timeout);
        // Idle connections do not hold the daemon; close them now.
        self.close_finished();
        if self.in_flight > 0 {
            log::info!(
                "shutting down: waiting for {} command(s) in flight",
                self.in_flight
            );
        }
    }

    /// Still waiting for commands in flight or answers to go out.
    fn draining(&self, deadline: Instant) -> bool {
        (self.in_flight > 0 || self.conns.iter().any(|(_, c)| !c.out.is_empty()))
            && Instant::now() < deadline
    }

    /// Close the connections with nothing in flight and nothing to send.
    fn close_finished(&mut self) {
        let finished: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, ConnState::Reading) && c.out.is_empty())
            .map(|(k, _)| k)
            .collect();
        for k in finished {
            self.close(k, None);
        }
    }

    fn finish_drain(&self) {
        if self.in_flight > 0 {
            log::warn!(
                "shutting down with {} command(s) still in flight",
                self.in_flight
            );
        }
    }

    fn read_signals(&mut self) {
        let Some(sfd) = self.signals.as_mut() else {
            return;
        };
        while let Ok(Some(info)) = sfd.read_signal() {
            log::info!("received signal {}, shutting down", info.ssi_signo);
            self.shutdown.store(true, Ordering::SeqCst);
        }
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let (stream, _) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest in the backlog.
                    log::warn!("accept failed: {e}");
                    return;
                }
            };
            #[cfg(all(feature = "test-hooks", debug_assertions))]
            if self.panic_on_accept {
                panic!("RESERVD_TEST_LOOP_PANIC is set: a test of a bug in the event loop");
            }
            let peer_cred = peer_cred(&stream);
            let peer = peer_cred.map_or_else(|| "unknown peer".to_string(), |p| p.to_string());
            if let Some(allow) = &self.config.allow {
                if !allow.allows(peer_cred.as_ref()) {
                    // Dropping the stream closes it before the handshake.
                    if let Some(n) = self.refusals.refusal(std::time::Instant::now()) {
                        let more = if n > 0 {
                            format!(" ({n} more refused since the last report)")
                        } else {
                            String::new()
                        };
                        log::warn!("refusing connection from {peer}: not allowed{more}");
                    }
                    ServerStats::bump(&self.stats.refused_not_allowed);
                    continue;
                }
            }
            if self.conns.len() >= self.config.max_connections {
                log::warn!(
                    "refusing connection from {peer}: {} connections open",
                    self.conns.len()
                );
                ServerStats::bump(&self.stats.refused_limit);
                continue;
            }
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if let Err(e) = self.poll.registry().register(
                &mut SourceFd(&stream.as_raw_fd()),
                Token(key),
                Interest::READABLE,
            ) {
                log::warn!("cannot watch connection from {peer}: {e}");
                continue;
            }
            let decoder = Decoder::new(self.config.features);
            let mut out = VecDeque::with_capacity(4);
            out.extend(decoder.server_hello());
            let id = self.next_id;
            self.next_id += 1;
            log::debug!("connection {id} from {peer}");
            entry.insert(Conn {
                stream: Arc::new(stream),
                id,
                decoder,
                fd: None,
                state: ConnState::Reading,
                out,
                writable_registered: false,
                peer,
                peer_cred,
                frame_start: None,
            });
            ServerStats::bump(&self.stats.accepted);
            self.count_open();
            // The handshake is the first frame.
            self.frame_started(key);
            self.flush(key);
        }
    }

    /// Read what the decoder wants until the socket is empty or a request
    /// is complete. Nothing is read while a command is in flight or its
    /// answer is not all written: a client that does not read its answers
    /// is not read either, so each connection holds at most one answer.
    fn on_readable(&mut self, key: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if matches!(conn.state, ConnState::InFlight) || !conn.out.is_empty() {
                return;
            }
            let want = conn.decoder.wanted();
            // A CDB is peeked: the bytes stay in the socket. Those of a CDB
            // that makes a request on its own (PR IN) stay there until its
            // answer is about to be written (see `dispatch`); any others are
            // read once fed to the decoder. Reading a message frees it, and
            // the kernel then wakes whatever thread of the client waits on
            // that socket, which is QEMU's, asleep until the answer: woken
            // for nothing, on another CPU, while the command runs.
            let peeked = conn.decoder.at_cdb_start();
            let r = if peeked {
                fdpass::peek_with_fds(conn.stream.as_fd(), &mut self.buf[..want])
            } else {
                fdpass::recv_with_fds(conn.stream.as_fd(), &mut self.buf[..want])
            };
            let rcv = match r {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("connection {}: read failed: {e}", conn.id);
                    self.close(key, None);
                    return;
                }
            };
            if rcv.bad_control {
                self.close(key, Some(ProtoError::TruncatedControl));
                return;
            }
            if rcv.len == 0 {
                let err = conn.decoder.eof();
                self.close(key, Some(err));
                return;
            }
            let nfds = rcv.fds.len();
            let event = conn.decoder.feed(&self.buf[..rcv.len], nfds);
            if let Some(fd) = rcv.fds.into_iter().next() {
                conn.fd = Some(fd);
            }
            let at_boundary = conn.decoder.at_boundary();
            if peeked && matches!(event, Ok(None) | Ok(Some(Event::Negotiated(_)))) {
                if let Err(e) = fdpass::discard_peeked(conn.stream.as_fd(), rcv.len) {
                    log::debug!("connection {}: read failed: {e}", conn.id);
                    self.close(key, None);
                    return;
                }
            }
            match event {
                Err(e) => {
                    self.close(key, Some(e));
                    return;
                }
                Ok(None) | Ok(Some(Event::Negotiated(_))) => {
                    if at_boundary {
                        conn.frame_start = None;
                    } else {
                        self.frame_started(key);
                    }
                }
                Ok(Some(Event::Request(req))) => {
                    conn.frame_start = None;
                    self.dispatch(key, req, if peeked { rcv.len } else { 0 });
                    return;
                }
            }
        }
    }

    /// Run `request` on a thread of the crew. `peeked`: bytes of the
    /// request still in the socket, read (and so freed) just before the
    /// answer is written.
    fn dispatch(&mut self, key: usize, request: Request, peeked: usize) {
        let conn = &mut self.conns[key];
        let fd = conn.fd.take().expect("decoder checked the fd");
        conn.state = ConnState::InFlight;
        self.in_flight += 1;
        let peer_cred = conn.peer_cred;
        let (id, backend, tx, stream) = (
            conn.id,
            Arc::clone(&self.backend),
            self.done_tx.clone(),
            Arc::clone(&conn.stream),
        );
        log::debug!(
            "connection {id}: opcode {:#04x} service action {:#04x}",
            request.cdb[0],
            request.cdb[1] & 0x1f
        );
        self.ready.push(Box::new(move || {
            // A panic (a bug, e.g. on device data nobody foresaw) ends this
            // connection only: its thread, the loop and every other client
            // go on. The backends keep no state a half-done command could
            // leave inconsistent beyond their own mutexes, which they take
            // poison-tolerantly.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let cmd = Command {
                    nexus: id,
                    peer: peer_cred,
                    fd: fd.as_fd(),
                    cdb: &request.cdb,
                    params: &request.params,
                };
                backend::execute(backend.as_ref(), &cmd)
            }))
            .unwrap_or_else(|p| Err(BackendError::Panicked(crew::panic_message(p.as_ref()))));
            // The client's fd is closed after every request.
            drop(fd);
            let ended = match result {
                Ok(answer) => {
                    let bytes = encode_response(&request, &answer);
                    let discarded = fdpass::discard_peeked(stream.as_fd(), peeked);
                    match discarded.and_then(|()| write_some(&stream, &bytes)) {
                        Ok(n) => Ended::Answered {
                            unsent: bytes[n..].to_vec(),
                        },
                        Err(e) => Ended::WriteFailed(e),
                    }
                }
                Err(e) => Ended::Failed(e),
            };
            drop(stream);
            // The crew wakes the loop if another thread has it.
            let _ = tx.send(Completion { key, id, ended });
        }));
    }

    fn collect_completions(&mut self) {
        while let Ok(c) = self.done_rx.try_recv() {
            self.in_flight -= 1;
            let Some(conn) = self.conns.get_mut(c.key).filter(|conn| conn.id == c.id) else {
                // Closed while its command ran: the backend has not been told.
                self.backend.disconnect(c.id);
                continue;
            };
            // The command is over, whatever its result.
            conn.state = ConnState::Reading;
            match c.ended {
                Ended::Answered { unsent } => {
                    conn.out.extend(unsent);
                    conn.decoder.complete();
                    self.flush(c.key);
                    // Bytes may already be waiting; edge-triggered polling
                    // will not report them again.
                    if !self.shutdown.load(Ordering::SeqCst) {
                        self.on_readable(c.key);
                    }
                }
                Ended::WriteFailed(e) => {
                    log::debug!("connection {}: write failed: {e}", conn.id);
                    self.close(c.key, None);
                }
                Ended::Failed(e) => {
                    ServerStats::bump(&self.stats.backend_failures);
                    // A panic is a bug in reservd: louder than a transport failure.
                    let level = match e {
                        BackendError::Panicked(_) => log::Level::Error,
                        _ => log::Level::Warn,
                    };
                    log::log!(
                        level,
                        "connection {} ({}): {e}; closing",
                        conn.id,
                        conn.peer
                    );
                    self.close(c.key, None);
                }
            }
        }
    }

    fn flush(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        while !conn.out.is_empty() {
            let (a, _) = conn.out.as_slices();
            match fdpass::send(conn.stream.as_fd(), a) {
                Ok(n) => {
                    conn.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !conn.writable_registered {
                        conn.writable_registered = true;
                        let _ = self.poll.registry().reregister(
                            &mut SourceFd(&conn.stream.as_raw_fd()),
                            Token(key),
                            Interest::READABLE | Interest::WRITABLE,
                        );
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("connection {}: write failed: {e}", conn.id);
                    self.close(key, None);
                    return;
                }
            }
        }
        if conn.writable_registered {
            conn.writable_registered = false;
            let _ = self.poll.registry().reregister(
                &mut SourceFd(&conn.stream.as_raw_fd()),
                Token(key),
                Interest::READABLE,
            );
        }
    }

    fn close(&mut self, key: usize, why: Option<ProtoError>) {
        if !self.conns.contains(key) {
            return;
        }
        let busy = matches!(self.conns[key].state, ConnState::InFlight);
        let conn = self.conns.remove(key);
        self.count_open();
        if why
            .as_ref()
            .is_some_and(|e| !matches!(e, ProtoError::Closed))
        {
            ServerStats::bump(&self.stats.protocol_errors);
        }
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&conn.stream.as_raw_fd()));
        match why {
            Some(ProtoError::Closed) | None => {
                log::debug!("connection {} ({}) closed", conn.id, conn.peer)
            }
            Some(e) => log::debug!("connection {} ({}): {e}; closing", conn.id, conn.peer),
        }
        if !busy {
            self.backend.disconnect(conn.id);
        }
    }

    fn count_open(&self) {
        self.stats.open.store(
            self.conns.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// The server and its event buffer, run by the crew one turn at a time.
struct Turns {
    server: Server,
    events: Events,
}

impl crew::Loop for Turns {
    type Output = io::Result<()>;
    fn turn(&mut self) -> crew::Turn<io::Result<()>> {
        self.server.turn(&mut self.events)
    }

    fn waker(&self) -> Arc<dyn Fn() + Send + Sync> {
        let waker = Arc::clone(&self.server.waker);
        Arc::new(move || {
            let _ = waker.wake();
        })
    }

    fn taken_over(&mut self) {
        ServerStats::bump(&self.server.stats.rescues);
    }
}

/// The signals that stop the daemon.
pub fn stop_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut s = SigSet::empty();
    s.add(Signal::SIGTERM);
    s.add(Signal::SIGINT);
    s.add(Signal::SIGHUP);
    s
}

/// Block the stop signals in this thread (and threads it starts later), so
/// they are delivered through the signal fd. Also ignore SIGPIPE.
#[allow(unsafe_code)]
pub fn block_stop_signals() -> io::Result<()> {
    use nix::sys::signal::{signal, SigHandler, Signal};
    stop_signals().thread_block()?;
    // SAFETY: installing SIG_IGN runs no handler code in signal context.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) }?;
    Ok(())
}

/// Raise the soft RLIMIT_NOFILE (up to the hard limit) so that
/// `max_connections` clients, each with a device fd in flight, fit: the
/// usual soft default of 1024 would make accept fail with EMFILE long before
/// the default connection limit. The daemon calls it before its seccomp
/// filter, which lets the limit be read but not changed.
pub fn raise_fd_limit(max_connections: usize, max_workers: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let want = (max_connections as u64)
        .saturating_add(max_workers as u64)
        .saturating_add(FD_HEADROOM);
    let target = want.min(hard);
    if soft < target {
        match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => log::debug!("raised the open-file limit from {soft} to {target}"),
            Err(e) => log::warn!("cannot raise the open-file limit from {soft}: {e}"),
        }
    }
    if hard < want {
        log::warn!(
            "the open-file limit ({hard}) is below what {max_connections} connections \
             need ({want}); connections beyond it wait in the listen backlog"
        );
    }
}

/// Write as much of `bytes` as the non-blocking socket takes now; the
/// number written (less than `bytes.len()` only when the socket is full).
fn write_some(stream: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < bytes.len() {
        match fdpass::send(stream.as_fd(), &bytes[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

fn peer_cred(stream: &UnixStream) -> Option<Peer> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    getsockopt(stream, PeerCredentials).ok().map(|c| Peer {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}
