//! A panic on the thread that runs the event loop (a bug) stops the server:
//! `Server::run` returns an error and an error line is logged, rather than
//! the server keeping its socket open with no thread serving it.
//!
//! The panic is a backend's: when a client's connection closes, the loop
//! tells the backend (`PrBackend::disconnect`) on its own thread.

use std::sync::{Arc, Mutex};

use log::{Level, LevelFilter, Log, Metadata, Record};
use reservd_daemon::backend::{BackendError, Command, Nexus, PrBackend};
use reservd_proto::sense::Answer;
use reservd_testkit::emulated::Emulated;
use reservd_testkit::server::{test_config, TestServer};

/// The emulated target, but for a disconnect, which panics.
struct PanicsOnDisconnect(Emulated);

impl PrBackend for PanicsOnDisconnect {
    fn execute(&self, cmd: &Command<'_>) -> Result<Answer, BackendError> {
        self.0.execute(cmd)
    }

    fn disconnect(&self, nexus: Nexus) {
        panic!("disconnect of connection {nexus}");
    }
}

/// Keeps the error lines logged.
struct Errors(Mutex<Vec<String>>);

impl Log for Errors {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= Level::Error
    }
    fn log(&self, r: &Record<'_>) {
        if self.enabled(r.metadata()) {
            let line = format!("{} {}", r.target(), r.args());
            self.0.lock().unwrap().push(line);
        }
    }
    fn flush(&self) {}
}

#[test]
fn a_panic_on_the_loops_thread_stops_the_server_with_an_error() {
    let errors: &'static Errors = Box::leak(Box::new(Errors(Mutex::new(Vec::new()))));
    log::set_logger(errors).unwrap();
    log::set_max_level(LevelFilter::Error);

    let mut server =
        TestServer::start(Arc::new(PanicsOnDisconnect(Emulated::new())), test_config());
    // A client that has connected and leaves: the loop closes its
    // connection and tells the backend, which panics.
    drop(server.ready());
    let e = server.join().expect_err("run returns an error");
    assert_eq!(
        e.to_string(),
        "a thread of the event loop panicked (a bug in reservd): disconnect of connection 1"
    );
    let errors = errors.0.lock().unwrap();
    assert_eq!(
        *errors,
        vec![
            "reservd_daemon::server::crew a thread of the event loop panicked (a bug in \
             reservd): disconnect of connection 1; stopping"
                .to_string()
        ]
    );
}
