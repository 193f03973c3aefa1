//! A server running in-process on a temporary socket (on the emulated
//! target, or any backend), and a backend that holds commands as a hung
//! device would.

use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use crate::disks::{unique_path, Disk};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::emulated::Emulated;
use reservd_client::client::Client;
use reservd_daemon::backend::{BackendError, Command, Nexus, PrBackend};
use reservd_daemon::server::{Config, Server, ShutdownHandle};
use reservd_proto::sense::{Answer, SenseCode, Status};

/// Longest a test waits for anything the server should do at once.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The server configuration tests use: a short drain, so that a failing
/// test does not hold the process for minutes.
pub fn test_config() -> Config {
    Config {
        drain_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

/// A server running on its own thread.
pub struct TestServer {
    pub path: PathBuf,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl TestServer {
    pub fn start(backend: Arc<dyn PrBackend>, config: Config) -> TestServer {
        let path = unique_path("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = Server::new(listener, backend, config).unwrap();
        let handle = server.shutdown_handle();
        let thread = std::thread::Builder::new()
            .name("reservd-test-server".into())
            .spawn(move || server.run())
            .unwrap();
        TestServer {
            path,
            handle,
            thread: Some(thread),
        }
    }

    /// A server with the emulated target and the test configuration.
    pub fn emulated() -> (TestServer, Arc<Emulated>) {
        let emu = Arc::new(Emulated::new());
        (TestServer::start(emu.clone(), test_config()), emu)
    }

    /// A client that has negotiated no features, as QEMU does.
    pub fn client(&self) -> Client {
        let c = Client::connect(&self.path).unwrap();
        set_timeouts(c.stream());
        c
    }

    /// A connected socket before the handshake.
    pub fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        set_timeouts(&s);
        s
    }

    /// A connected socket after a handshake requesting no features.
    pub fn ready(&self) -> UnixStream {
        let mut s = self.raw();
        assert_eq!(crate::frames::read_hello(&mut s), 0);
        s.write_all(&[0, 0, 0, 0]).unwrap();
        s
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Whether `run()` has returned.
    pub fn has_stopped(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Wait (boundedly) for `run()` to return; its result.
    pub fn join(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        while !self.has_stopped() {
            assert!(Instant::now() < deadline, "the server did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.thread.take().map_or(Ok(()), |t| t.join().unwrap())
    }

    /// Check that the server still serves a new client.
    #[track_caller]
    pub fn assert_serves(&self) {
        let disk = Disk::new();
        let mut c = self.client();
        let r = c
            .execute(&crate::frames::cdb_in(0, 8192), disk.fd(), &[])
            .expect("a new client is served");
        assert_eq!(r.status, Status::GOOD);
        assert_eq!(r.data.len(), 8);
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn set_timeouts(s: &UnixStream) {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
}

/// A GOOD response, as the client saw it.
#[track_caller]
pub fn assert_good(r: &Answer) {
    assert_eq!(r.status, Status::GOOD, "{r:?}");
}

#[track_caller]
pub fn assert_check(r: &Answer, code: SenseCode) {
    assert_eq!(r.status, Status::CHECK_CONDITION, "{r:?}");
    assert_eq!(r.sense_code(), Some(code), "{r:?}");
    assert_eq!(r.sense[..18], code.fixed());
    assert!(r.sense[18..].iter().all(|&b| b == 0));
    assert!(r.data.is_empty());
}

/// CDB byte 15 (beyond every 10-byte CDB) marking a command that [`Gate`]
/// holds.
pub const HOLD: u8 = 0xa5;

/// A backend that runs commands on an emulated target, except those marked
/// with [`HOLD`]: they wait, as on a hung device, until the gate opens.
pub struct Gate {
    pub inner: Emulated,
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    open: bool,
    waiting: usize,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate {
            inner: Emulated::new(),
            state: Mutex::new(GateState::default()),
            cv: Condvar::new(),
        })
    }

    /// Wait (boundedly) until `n` held commands are waiting.
    pub fn wait_for_held(&self, n: usize) {
        let st = self.state.lock().unwrap();
        let (st, timeout) = self
            .cv
            .wait_timeout_while(st, TIMEOUT, |st| st.waiting < n)
            .unwrap();
        assert!(!timeout.timed_out(), "{} held, wanted {n}", st.waiting);
    }

    pub fn held(&self) -> usize {
        self.state.lock().unwrap().waiting
    }

    pub fn open(&self) {
        self.state.lock().unwrap().open = true;
        self.cv.notify_all();
    }
}

impl PrBackend for Gate {
    fn execute(&self, cmd: &Command<'_>) -> Result<Answer, BackendError> {
        if cmd.cdb[15] == HOLD {
            let mut st = self.state.lock().unwrap();
            st.waiting += 1;
            self.cv.notify_all();
            while !st.open {
                st = self.cv.wait(st).unwrap();
            }
            st.waiting -= 1;
        }
        self.inner.execute(cmd)
    }

    fn disconnect(&self, nexus: Nexus) {
        self.inner.disconnect(nexus)
    }
}

/// Opens the gate when dropped, so that a failing test does not leave a
/// worker (and the server's drain) waiting.
pub struct OpenOnDrop(pub Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// A server whose backend is a new [`Gate`], with the guard that opens it.
/// Bind all three, in this order (`let (gate, _open, server) = ...`): the
/// server is dropped first, then the guard opens the gate.
pub fn gated_server(config: Config) -> (Arc<Gate>, OpenOnDrop, TestServer) {
    let gate = Gate::new();
    let open = OpenOnDrop(gate.clone());
    let server = TestServer::start(gate.clone(), config);
    (gate, open, server)
}

/// `cdb` marked with [`HOLD`], for a [`Gate`] to hold.
pub fn held(mut cdb: [u8; 16]) -> [u8; 16] {
    cdb[15] = HOLD;
    cdb
}
