//! A client of multipathd's command socket.
//!
//! reservd speaks the protocol itself rather than loading libmpathcmd: the
//! framing is a few lines, the socket can be pointed anywhere (tests run a
//! fake multipathd on a temporary path), the timeout is reservd's, and a
//! missing libmpathcmd cannot break anything.
//!
//! Protocol (multipath-tools' `libmpathcmd`): each request and each reply
//! is a `size_t` length in host byte order (8 bytes on 64-bit Linux),
//! counting a trailing NUL, then that many bytes. Replies shorter than 1
//! byte or of 32 MiB or more are refused. Sockets tried, in order: the one
//! named by `MULTIPATH_SOCKET_NAME` alone if set (a leading `@` means an
//! abstract name), else the pathname socket `/run/multipathd.socket`
//! (multipath-tools 0.12 and later), then the abstract socket
//! `@/org/kernel/linux/storage/multipathd` (every version). multipathd
//! accepts commands other than `list`/`show` only from uid 0.

use std::io::{self, Read, Write};
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

pub const PATHNAME_SOCKET: &str = "/run/multipathd.socket";
pub const ABSTRACT_SOCKET: &str = "@/org/kernel/linux/storage/multipathd";
pub const SOCKET_ENV: &str = "MULTIPATH_SOCKET_NAME";
/// libmpathcmd's `MAX_REPLY_LEN`.
pub const MAX_REPLY_LEN: usize = 32 * 1024 * 1024;

/// Where multipathd may listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketName {
    Path(PathBuf),
    /// An abstract name, without the leading NUL (or `@`).
    Abstract(Vec<u8>),
}

impl SocketName {
    /// libmpathcmd's notation: `@name` is abstract, anything else a path.
    pub fn parse(s: &str) -> SocketName {
        match s.strip_prefix('@') {
            Some(a) => SocketName::Abstract(a.as_bytes().to_vec()),
            None => SocketName::Path(PathBuf::from(s)),
        }
    }

    fn connect(&self) -> io::Result<UnixStream> {
        match self {
            SocketName::Path(p) => UnixStream::connect(p),
            SocketName::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                UnixStream::connect_addr(&SocketAddr::from_abstract_name(name)?)
            }
        }
    }
}

impl std::fmt::Display for SocketName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketName::Path(p) => write!(f, "{}", p.display()),
            SocketName::Abstract(a) => write!(f, "@{}", String::from_utf8_lossy(a)),
        }
    }
}

/// How to reach multipathd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Multipathd {
    pub sockets: Vec<SocketName>,
    pub timeout: Duration,
}

/// Timeout of each exchange; the CLEANUP extension's value.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

impl Multipathd {
    /// The sockets libmpathcmd would try, given `MULTIPATH_SOCKET_NAME`.
    pub fn from_env_value(env: Option<&str>) -> Multipathd {
        let sockets = match env {
            Some(name) if !name.is_empty() => vec![SocketName::parse(name)],
            _ => vec![
                SocketName::parse(PATHNAME_SOCKET),
                SocketName::parse(ABSTRACT_SOCKET),
            ],
        };
        Multipathd {
            sockets,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn from_env() -> Multipathd {
        Multipathd::from_env_value(std::env::var(SOCKET_ENV).ok().as_deref())
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Multipathd {
        self.timeout = timeout;
        self
    }

    /// Connect to the first socket that answers.
    pub fn connect(&self) -> io::Result<Connection> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no multipathd socket to try");
        for s in &self.sockets {
            match s.connect() {
                Ok(stream) => {
                    stream.set_read_timeout(Some(self.timeout))?;
                    stream.set_write_timeout(Some(self.timeout))?;
                    return Ok(Connection { stream });
                }
                Err(e) => last = io::Error::new(e.kind(), format!("{s}: {e}")),
            }
        }
        Err(last)
    }

    /// Describe where reservd looks, for messages.
    pub fn describe(&self) -> String {
        self.sockets
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    }
}

/// One connection to multipathd; several commands may use it in turn.
pub struct Connection {
    stream: UnixStream,
}

impl Connection {
    /// Send `cmd`, return the reply without its trailing NUL.
    pub fn command(&mut self, cmd: &str) -> io::Result<String> {
        self.stream.write_all(&encode_frame(cmd))?;
        let mut len = [0u8; std::mem::size_of::<usize>()];
        self.stream.read_exact(&mut len)?;
        let len = reply_len(len)?;
        let mut reply = vec![0u8; len];
        self.stream.read_exact(&mut reply)?;
        Ok(decode_reply(reply))
    }
}

/// A request frame: host-order `size_t` length including the NUL, the
/// command, the NUL.
pub fn encode_frame(cmd: &str) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + cmd.len() + 1);
    f.extend_from_slice(&(cmd.len() + 1).to_ne_bytes());
    f.extend_from_slice(cmd.as_bytes());
    f.push(0);
    f
}

/// Check a reply length as libmpathcmd does.
pub fn reply_len(b: [u8; std::mem::size_of::<usize>()]) -> io::Result<usize> {
    let len = usize::from_ne_bytes(b);
    if len == 0 || len >= MAX_REPLY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("multipathd reply length {len} out of range"),
        ));
    }
    Ok(len)
}

/// The reply text: up to the first NUL (libmpathcmd NUL-terminates).
pub fn decode_reply(mut reply: Vec<u8>) -> String {
    if let Some(n) = reply.iter().position(|&c| c == 0) {
        reply.truncate(n);
    }
    String::from_utf8_lossy(&reply).into_owned()
}

/// The CLEANUP conversation for map `dm-<minor>` over one connection: drop
/// the key multipathd would re-register on reinstated paths, and the
/// registered flag. Each reply must be exactly `ok\n`.
pub fn clear_map_keys(conn: &mut Connection, minor: u32) -> io::Result<()> {
    for cmd in [
        format!("unsetprkey map dm-{minor}"),
        format!("unsetprstatus map dm-{minor}"),
    ] {
        let reply = conn.command(&cmd)?;
        if reply != "ok\n" {
            return Err(io::Error::other(format!(
                "multipathd answered {reply:?} to {cmd:?}"
            )));
        }
    }
    Ok(())
}

/// The reservation key multipathd keeps for the map `dm-<minor>`
/// (`getprkey`): `None` when it has none.
pub fn map_key(conn: &mut Connection, minor: u32) -> io::Result<Option<u64>> {
    let cmd = format!("getprkey map dm-{minor}");
    let reply = conn.command(&cmd)?;
    parse_prkey(&reply)
        .ok_or_else(|| io::Error::other(format!("multipathd answered {reply:?} to {cmd:?}")))
}

/// A `getprkey` reply: `none`, or the key in hex with an optional
/// `:aptpl` suffix.
pub fn parse_prkey(reply: &str) -> Option<Option<u64>> {
    let r = reply.trim_end();
    if r == "none" {
        return Some(None);
    }
    let hex = r.strip_suffix(":aptpl").unwrap_or(r).strip_prefix("0x")?;
    let key = u64::from_str_radix(hex, 16).ok()?;
    Some((key != 0).then_some(key))
}

/// A fake multipathd on a UNIX socket, for tests (also used by the
/// multipath backend's tests).
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    pub struct Fake {
        pub path: PathBuf,
        pub seen: Arc<Mutex<Vec<String>>>,
        handle: Option<JoinHandle<()>>,
    }

    impl Fake {
        /// Serve `connections` connections; each command gets
        /// `answer(cmd)` (None: close the connection without a reply).
        pub fn start(
            connections: usize,
            answer: impl Fn(&str) -> Option<String> + Send + 'static,
        ) -> Fake {
            let dir = std::env::temp_dir().join(format!(
                "reservd-mpd-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("multipathd.socket");
            let listener = UnixListener::bind(&path).unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let log = Arc::clone(&seen);
            let handle = std::thread::spawn(move || {
                for _ in 0..connections {
                    let Ok((mut s, _)) = listener.accept() else {
                        return;
                    };
                    loop {
                        let mut len = [0u8; 8];
                        if s.read_exact(&mut len).is_err() {
                            break;
                        }
                        let mut cmd = vec![0u8; usize::from_ne_bytes(len)];
                        s.read_exact(&mut cmd).unwrap();
                        assert_eq!(cmd.pop(), Some(0), "request not NUL-terminated");
                        let cmd = String::from_utf8(cmd).unwrap();
                        log.lock().unwrap().push(cmd.clone());
                        match answer(&cmd) {
                            Some(r) => {
                                s.write_all(&encode_frame(&r)).unwrap();
                            }
                            None => break,
                        }
                    }
                }
            });
            Fake {
                path,
                seen,
                handle: Some(handle),
            }
        }

        pub fn client(&self) -> Multipathd {
            Multipathd {
                sockets: vec![SocketName::Path(self.path.clone())],
                timeout: Duration::from_secs(5),
            }
        }

        /// Wait for the server thread; returns the commands it saw.
        pub fn finish(mut self) -> Vec<String> {
            if let Some(h) = self.handle.take() {
                h.join().expect("fake multipathd panicked");
            }
            let _ = std::fs::remove_dir_all(self.path.parent().unwrap());
            self.seen.lock().unwrap().clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_host_order_size_t_with_nul() {
        let f = encode_frame("show daemon");
        assert_eq!(f.len(), 8 + 12);
        assert_eq!(&f[..8], &12usize.to_ne_bytes());
        assert_eq!(&f[8..], b"show daemon\0");
    }

    #[test]
    fn reply_length_bounds() {
        assert!(reply_len(0usize.to_ne_bytes()).is_err());
        assert!(reply_len(MAX_REPLY_LEN.to_ne_bytes()).is_err());
        assert_eq!(reply_len(4usize.to_ne_bytes()).unwrap(), 4);
        assert_eq!(decode_reply(b"ok\n\0".to_vec()), "ok\n");
        assert_eq!(decode_reply(b"ok\n".to_vec()), "ok\n");
    }

    #[test]
    fn socket_order_follows_libmpathcmd() {
        let d = Multipathd::from_env_value(None);
        assert_eq!(
            d.sockets,
            vec![
                SocketName::Path("/run/multipathd.socket".into()),
                SocketName::Abstract(b"/org/kernel/linux/storage/multipathd".to_vec()),
            ]
        );
        let d = Multipathd::from_env_value(Some("@foo"));
        assert_eq!(d.sockets, vec![SocketName::Abstract(b"foo".to_vec())]);
        let d = Multipathd::from_env_value(Some("/x/y.sock"));
        assert_eq!(d.sockets, vec![SocketName::Path("/x/y.sock".into())]);
        assert_eq!(d.describe(), "/x/y.sock");
    }

    #[test]
    fn getprkey_replies() {
        assert_eq!(parse_prkey("none\n"), Some(None));
        assert_eq!(parse_prkey("0x1234\n"), Some(Some(0x1234)));
        assert_eq!(
            parse_prkey("0xaaaabbbbccccdddd:aptpl\n"),
            Some(Some(0xaaaabbbbccccdddd))
        );
        assert_eq!(parse_prkey("0x0\n"), Some(None));
        for bad in [
            "fail\n",
            "",
            "1234\n",
            "0x\n",
            "0x12345678123456789\n",
            "0xzz\n",
        ] {
            assert_eq!(parse_prkey(bad), None, "{bad:?}");
        }
        let fake = fake::Fake::start(1, |cmd| {
            Some(match cmd {
                "getprkey map dm-4" => "0x77\n".into(),
                _ => "fail\n".into(),
            })
        });
        let mut conn = fake.client().connect().unwrap();
        assert_eq!(map_key(&mut conn, 4).unwrap(), Some(0x77));
        assert!(map_key(&mut conn, 5).is_err());
        drop(conn);
        assert_eq!(
            fake.finish(),
            vec!["getprkey map dm-4", "getprkey map dm-5"]
        );
    }

    #[test]
    fn cleanup_conversation_on_one_connection() {
        let f = fake::Fake::start(1, |_| Some("ok\n".into()));
        let mut c = f.client().connect().unwrap();
        clear_map_keys(&mut c, 3).unwrap();
        drop(c);
        assert_eq!(
            f.finish(),
            vec!["unsetprkey map dm-3", "unsetprstatus map dm-3"]
        );
    }

    #[test]
    fn cleanup_fails_on_any_other_reply() {
        let f = fake::Fake::start(1, |cmd| {
            Some(if cmd.starts_with("unsetprstatus") {
                "fail\n".into()
            } else {
                "ok\n".into()
            })
        });
        let mut c = f.client().connect().unwrap();
        let e = clear_map_keys(&mut c, 7).unwrap_err();
        assert!(e.to_string().contains("fail"), "{e}");
        drop(c);
        assert_eq!(f.finish().len(), 2);
        // "ok" without the newline is not "ok\n".
        let f = fake::Fake::start(1, |_| Some("ok".into()));
        let mut c = f.client().connect().unwrap();
        assert!(clear_map_keys(&mut c, 7).is_err());
        drop(c);
        assert_eq!(f.finish(), vec!["unsetprkey map dm-7"]);
    }

    #[test]
    fn a_closed_connection_is_an_error() {
        let f = fake::Fake::start(1, |_| None);
        let mut c = f.client().connect().unwrap();
        assert!(clear_map_keys(&mut c, 1).is_err());
        drop(c);
        f.finish();
    }

    #[test]
    fn unreachable_multipathd_names_the_socket() {
        let d = Multipathd::from_env_value(Some("/nonexistent/reservd/multipathd.socket"));
        let e = d.connect().err().unwrap();
        assert!(e.to_string().contains("/nonexistent/reservd"), "{e}");
    }
}
