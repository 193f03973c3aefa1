//! QEMU as the client: a `pr-manager-helper` object on a socket, and a
//! minimal QMP client to ask QEMU what it sees.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use crate::frames::connect;
use crate::spawn::Proc;

pub const QEMU: &str = "qemu-system-x86_64";

/// QEMU with one pr-manager-helper object on `sock` and QMP on `qmp`.
pub fn qemu(sock: &Path, qmp: &Path) -> Proc {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-M", "none", "-nodefaults", "-display", "none", "-object"])
        .arg(format!("pr-manager-helper,id=pr0,path={}", sock.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    Proc::spawn(cmd)
}

/// A minimal QMP client: one JSON object per line.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect, check the greeting and leave capabilities negotiation.
    pub fn connect(path: &Path) -> Qmp {
        let s = connect(path);
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        let greeting = q.line();
        assert!(
            greeting.starts_with(r#"{"QMP": {"version": "#),
            "{greeting}"
        );
        assert_eq!(q.execute("qmp_capabilities"), r#"{"return": {}}"#);
        q
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        let n = self.reader.read_line(&mut l).expect("QMP read");
        assert!(n > 0, "QMP connection closed");
        l.trim_end().to_string()
    }

    /// Run `command` and return its reply line, skipping events.
    pub fn execute(&mut self, command: &str) -> String {
        writeln!(self.writer, r#"{{"execute": "{command}"}}"#).unwrap();
        loop {
            let l = self.line();
            if l.starts_with(r#"{"return""#) || l.starts_with(r#"{"error""#) {
                return l;
            }
            assert!(l.starts_with(r#"{"timestamp""#), "unexpected QMP line {l}");
        }
    }
}
