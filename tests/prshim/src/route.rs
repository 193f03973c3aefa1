//! The process's one connection to reservd, and the trace file.

use std::fs::File;
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Mutex;

use reservd_client::client::Client;
use reservd_proto::sense::Answer;

use crate::translate::{describe, Prepared};

/// Environment variable naming reservd's socket.
pub const SOCKET_VAR: &str = "RESERVD_PRSHIM_SOCKET";
/// Environment variable naming the trace file (optional).
pub const TRACE_VAR: &str = "RESERVD_PRSHIM_TRACE";

struct State {
    socket: Option<PathBuf>,
    client: Option<Client>,
    trace: Option<File>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Send one prepared command with `fd` and `params` to reservd and return
/// its answer. Connects (with the handshake, no features requested) on
/// first use; a connection that fails is dropped, and the next command
/// connects again, as QEMU's client does. `Err` says why no answer came.
pub fn execute(fd: BorrowedFd<'_>, req: &Prepared, params: &[u8]) -> Result<Answer, String> {
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let state = guard.get_or_insert_with(|| State {
        socket: std::env::var_os(SOCKET_VAR).map(PathBuf::from),
        client: None,
        trace: std::env::var_os(TRACE_VAR).and_then(|p| {
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| eprintln!("reservd-prshim: cannot open the trace file: {e}"))
                .ok()
        }),
    });
    let result = run(state, fd, req, params);
    let line = match &result {
        Ok(resp) => describe(&req.cdb, resp),
        Err(e) => format!(
            "{:02x} sa={:#04x} -> no answer: {e}",
            req.cdb[0],
            req.cdb[1] & 0x1f
        ),
    };
    if let Some(t) = &mut state.trace {
        let _ = writeln!(t, "{line}");
    }
    result
}

fn run(
    state: &mut State,
    fd: BorrowedFd<'_>,
    req: &Prepared,
    params: &[u8],
) -> Result<Answer, String> {
    let Some(socket) = &state.socket else {
        return Err(format!("{SOCKET_VAR} is not set"));
    };
    if state.client.is_none() {
        let c = Client::connect(socket)
            .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
        state.client = Some(c);
    }
    let client = state.client.as_mut().expect("connected above");
    client.execute(&req.cdb, fd, params).map_err(|e| {
        state.client = None;
        format!("connection to {} lost: {e}", socket.display())
    })
}
