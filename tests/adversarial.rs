//! Hostile clients against reservd. Every client is an untrusted QEMU
//! process: whatever one of them sends, the daemon must go on serving the
//! others, keep no file descriptor or memory from it, and send nothing to a
//! device for a request it did not accept.
//!
//! The first part drives the built binary (`reservd -k SOCKET`) and checks,
//! after every case, that another client is still answered (PR IN on a
//! regular file: CHECK CONDITION, ABORTED COMMAND/00/06 from ENOTTY), and
//! that the daemon's open fds (`/proc/PID/fd`) and resident memory
//! (`VmRSS`) are back where they were. The second part runs the server
//! in-process with test backends: one that counts what reaches it (nothing
//! malformed may), and one that hangs like a dead device.

use std::io::Write;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reservd_daemon::backend::{BackendError, Command as PrCommand, Nexus, PrBackend};
use reservd_daemon::server::Config;
use reservd_proto::sense::Answer;
use reservd_testkit::disks::*;
use reservd_testkit::emulated::Emulated;
use reservd_testkit::frames::*;
use reservd_testkit::spawn::*;

/// The daemon under test.
const RESERVD: &str = env!("CARGO_BIN_EXE_reservd");

/// Resident memory a case may leave behind (allocator caches, a worker
/// thread's arena).
const RSS_SLACK_KB: u64 = 4096;

// ------------------------------------------------------------ the binary

/// reservd running on a socket in a temporary directory, with a regular
/// file standing for a disk.
struct Daemon {
    proc: Proc,
    sock: PathBuf,
    dir: TempDir,
    base_fds: usize,
    base_rss: u64,
    cases: usize,
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

fn rss_kb(pid: i32) -> u64 {
    proc_status(pid, "VmRSS")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("VmRSS in kB")
}

/// The soft open-file limit of `pid`.
fn nofile_soft(pid: i32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Set this process's soft RLIMIT_NOFILE to at least `n` (up to the hard limit).
fn raise_own_nofile(n: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < n {
        setrlimit(Resource::RLIMIT_NOFILE, n.min(hard), hard).unwrap();
    }
    getrlimit(Resource::RLIMIT_NOFILE).unwrap().0
}

impl Daemon {
    /// Start reservd with the usual service soft limit of 1024 open files.
    #[allow(unsafe_code)] // pre_exec, to lower the child's open-file limit
    fn start() -> Daemon {
        let dir = TempDir::new();
        let sock = dir.join("reservd.sock");
        let mut cmd = Command::new(RESERVD);
        cmd.args(["-k", sock.to_str().unwrap()]);
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                    lim.rlim_cur = lim.rlim_cur.min(1024);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                }
                Ok(())
            });
        }
        let mut proc = Proc::spawn(cmd);
        proc.wait_socket(&sock);
        let mut d = Daemon {
            proc,
            sock,
            dir,
            base_fds: 0,
            base_rss: 0,
            cases: 0,
        };
        // Warm up: server threads, allocator arenas, the largest buffers.
        for _ in 0..4 {
            d.assert_serves();
            let (mut s, _) = hello(&d.sock, 0);
            let f = regular_file(&d.dir, "warm");
            send_frame(&s, &read_keys(8192), &[f.as_fd()]);
            read_reply(&mut s).answer();
            let mut big = register(8192).to_vec();
            big.extend(vec![0u8; 8192]);
            send_frame(&s, &big, &[f.as_fd()]);
            read_reply(&mut s).answer();
        }
        d.base_fds = d.settled_fds(None);
        d.base_rss = rss_kb(d.pid());
        d
    }

    fn pid(&self) -> i32 {
        self.proc.pid()
    }

    fn disk(&self) -> std::fs::File {
        regular_file(&self.dir, "disk.img")
    }

    /// A fresh client that has negotiated no features.
    fn client(&self) -> UnixStream {
        hello(&self.sock, 0).0
    }

    /// Another client is answered as usual.
    #[track_caller]
    fn assert_serves(&self) {
        let mut s = self.client();
        let f = self.disk();
        send_frame(&s, &read_keys(0x2000), &[f.as_fd()]);
        let o = read_reply(&mut s);
        assert_eq!(o.status(), 2, "{o:?}");
        assert_eq!(o.sense_code(), (0x0b, 0x00, 0x06));
        assert_eq!(o.data_len(), 0);
    }

    /// Wait (boundedly) for the fd count to reach `want`, or to stop
    /// changing when `want` is `None`; the count.
    fn settled_fds(&self, want: Option<usize>) -> usize {
        let mut last = fd_count(self.pid());
        let mut stable = 0;
        let end = Instant::now() + DEADLINE;
        loop {
            std::thread::sleep(Duration::from_millis(5));
            let n = fd_count(self.pid());
            match want {
                Some(w) if n == w => return n,
                None if n == last => {
                    stable += 1;
                    if stable >= 5 {
                        return n;
                    }
                }
                _ => stable = 0,
            }
            last = n;
            if Instant::now() > end {
                return n;
            }
        }
    }

    /// After a case: still alive and serving, no fd kept, memory back.
    #[track_caller]
    fn assert_healthy(&mut self, case: &str) {
        self.cases += 1;
        assert!(
            self.proc.try_status().is_none(),
            "{case}: reservd exited; stderr: {}",
            self.proc.stderr()
        );
        self.assert_serves();
        let fds = self.settled_fds(Some(self.base_fds));
        assert_eq!(fds, self.base_fds, "{case}: fd count");
        let rss = rss_kb(self.pid());
        assert!(
            rss <= self.base_rss + RSS_SLACK_KB,
            "{case}: VmRSS {rss} kB, {} kB before",
            self.base_rss
        );
    }
}

/// Send `bytes` (with `fds` on the first byte) on a fresh client after the
/// handshake; the daemon must close the connection without an answer.
#[track_caller]
fn expect_closed(d: &Daemon, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut s = d.client();
    send_frame(&s, bytes, fds);
    assert_eq!(read_reply(&mut s), Reply::Closed, "{bytes:02x?}");
}

/// A frame the daemon must answer with CHECK CONDITION (the connection stays).
#[track_caller]
fn expect_check(s: &mut UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Reply {
    send_frame(s, bytes, fds);
    let o = read_reply(s);
    assert_eq!(o.status(), 2, "{o:?}");
    assert_eq!(o.data_len(), 0);
    o
}

fn frame(cdb: [u8; 16], params: &[u8]) -> Vec<u8> {
    let mut v = cdb.to_vec();
    v.extend_from_slice(params);
    v
}

fn prin_with_alloc(alloc: u16) -> [u8; 16] {
    read_keys(alloc)
}

fn prout_len(len: u32) -> [u8; 16] {
    let l = len.to_be_bytes();
    cdb(&[0x5f, 0x00, 0, 0, 0, l[0], l[1], l[2], l[3], 0])
}

#[test]
fn malformed_frames_close_only_their_connection() {
    let mut d = Daemon::start();
    let disk = d.disk();
    let fd = disk.as_fd();

    // Handshake: feature bits the daemon did not offer.
    for requested in [1u32, 2, 0x8000_0000, 0xffff_ffff] {
        let mut s = connect(&d.sock);
        read_features(&mut s);
        s.write_all(&requested.to_be_bytes()).unwrap();
        assert_eq!(read_reply(&mut s), Reply::Closed);
        d.assert_healthy(&format!("handshake {requested:#x}"));
    }
    // An fd with the handshake.
    {
        let mut s = connect(&d.sock);
        read_features(&mut s);
        send_frame(&s, &[0, 0, 0, 0], &[fd]);
        assert_eq!(read_reply(&mut s), Reply::Closed);
        d.assert_healthy("fd with the handshake");
    }
    // No fd, two fds, ten fds with a CDB.
    expect_closed(&d, &read_keys(8192), &[]);
    d.assert_healthy("no fd");
    expect_closed(&d, &read_keys(8192), &[fd, fd]);
    d.assert_healthy("two fds");
    expect_closed(&d, &read_keys(8192), &[fd; 10]);
    d.assert_healthy("ten fds");
    // As many as one message can carry (SCM_MAX_FD).
    expect_closed(&d, &read_keys(8192), &[fd; 253]);
    d.assert_healthy("253 fds");
    // An fd with the parameter list instead of the CDB.
    {
        let mut s = d.client();
        send_frame(&s, &register(24), &[fd]);
        send_frame(&s, &register_params(1), &[fd]);
        assert_eq!(read_reply(&mut s), Reply::Closed);
        d.assert_healthy("fd with the parameter list");
    }
    // Opcodes other than PR IN/OUT (0xFF: CLEANUP was not negotiated).
    for op in [0x00u8, 0x12, 0x28, 0x5d, 0x60, 0xa3, 0xff] {
        expect_closed(&d, &cdb(&[op]), &[fd]);
        d.assert_healthy(&format!("opcode {op:#04x}"));
    }
    // Transfer lengths over 8192.
    for len in [8193u16, 0xffff] {
        expect_closed(&d, &prin_with_alloc(len), &[fd]);
        d.assert_healthy(&format!("PR IN alloc {len}"));
        expect_closed(&d, &prout_len(len.into()), &[fd]);
        d.assert_healthy(&format!("PR OUT length {len}"));
    }
    // Only CDB bytes 7..8 count, as for qemu-pr-helper; their value here
    // is 0xffff.
    expect_closed(&d, &prout_len(0xffff_ffff), &[fd]);
    d.assert_healthy("PR OUT length 0xffffffff");
    eprintln!("malformed frames: {} cases", d.cases);
}

#[test]
fn eof_at_every_offset() {
    let mut d = Daemon::start();
    let disk = d.disk();
    // The handshake.
    for cut in 0..4 {
        let mut s = connect(&d.sock);
        read_features(&mut s);
        s.write_all(&[0u8; 4][..cut]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_reply(&mut s), Reply::Closed);
        d.assert_healthy(&format!("EOF after {cut} handshake bytes"));
    }
    // The CDB and the parameter list of a REGISTER.
    let whole = frame(register(24), &register_params(7));
    for cut in 0..whole.len() {
        let mut s = d.client();
        let fds = [disk.as_fd()];
        send_frame(&s, &whole[..cut], if cut > 0 { &fds } else { &[] });
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_reply(&mut s), Reply::Closed, "cut at {cut}");
        d.assert_healthy(&format!("EOF after {cut} request bytes"));
    }
    // And the same cuts with the peer gone altogether (no half-close).
    for cut in [1, 15, 16, 17, 39] {
        let s = d.client();
        send_frame(&s, &whole[..cut], &[disk.as_fd()]);
        drop(s);
        d.assert_healthy(&format!("vanished after {cut} request bytes"));
    }
    eprintln!("EOF cases: {}", d.cases);
}

/// An fd of each kind reservd might be handed instead of a disk.
#[allow(unsafe_code)] // eventfd, memfd_create and their fds
fn odd_fds(d: &Daemon) -> Vec<(&'static str, OwnedFd)> {
    let mut v: Vec<(&'static str, OwnedFd)> = Vec::new();
    let (a, b) = UnixStream::pair().unwrap();
    drop(b);
    v.push(("a socket", a.into()));
    v.push((
        "a directory",
        std::fs::File::open(d.dir.path()).unwrap().into(),
    ));
    for dev in ["/dev/null", "/dev/zero"] {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .unwrap();
        v.push((dev, f.into()));
    }
    let (r, w) = nix::unistd::pipe().unwrap();
    v.push(("a pipe's read end", r));
    v.push(("a pipe's write end", w));
    // SAFETY: eventfd and memfd_create take no pointers but the static
    // name; each returns a new fd we own, or -1 (checked).
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(efd >= 0);
    // SAFETY: efd is a fresh fd owned by nothing else.
    v.push(("an eventfd", unsafe { OwnedFd::from_raw_fd(efd) }));
    // SAFETY: as above; the name is a NUL-terminated literal.
    let mfd = unsafe { libc::memfd_create(c"reservd-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(mfd >= 0);
    // SAFETY: mfd is a fresh fd owned by nothing else.
    v.push(("a memfd", unsafe { OwnedFd::from_raw_fd(mfd) }));
    let p = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(d.dir.join("disk.img"))
        .unwrap();
    v.push(("an O_PATH fd", p.into()));
    let ro = std::fs::File::open(d.dir.join("disk.img")).unwrap();
    v.push(("a read-only file", ro.into()));
    v
}

#[test]
fn fd_games_are_answered_not_fatal() {
    let mut d = Daemon::start();
    for (what, fd) in odd_fds(&d) {
        let mut s = d.client();
        // PR IN and PR OUT on the same connection: each is answered with
        // CHECK CONDITION and the connection stays usable.
        expect_check(&mut s, &read_keys(8192), &[fd.as_fd()]);
        expect_check(
            &mut s,
            &frame(register(24), &register_params(1)),
            &[fd.as_fd()],
        );
        drop((fd, s));
        d.assert_healthy(what);
    }
    // An fd the client closes right after sending it: reservd holds its own
    // reference, so the command runs on the file as usual.
    {
        let mut s = d.client();
        let f = d.disk();
        send_frame(&s, &read_keys(8192), &[f.as_fd()]);
        drop(f);
        let o = read_reply(&mut s);
        assert_eq!(o.sense_code(), (0x0b, 0x00, 0x06));
        drop(s);
        d.assert_healthy("fd closed by the client after sending");
    }
    eprintln!("fd games: {} cases", d.cases);
}

#[test]
fn zero_and_maximal_lengths() {
    let mut d = Daemon::start();
    let disk = d.disk();
    for alloc in [0u16, 1, 7, 8, 8191, 8192] {
        let mut s = d.client();
        let o = expect_check(&mut s, &prin_with_alloc(alloc), &[disk.as_fd()]);
        assert_eq!(o.sense_code(), (0x0b, 0x00, 0x06));
        drop(s);
        d.assert_healthy(&format!("PR IN alloc {alloc}"));
    }
    for len in [0u32, 1, 23, 24, 25, 8191, 8192] {
        let mut s = d.client();
        let params: Vec<u8> = (0..len).map(|i| i as u8).collect();
        expect_check(&mut s, &frame(prout_len(len), &params), &[disk.as_fd()]);
        drop(s);
        d.assert_healthy(&format!("PR OUT length {len}"));
    }
    eprintln!("lengths: {} cases", d.cases);
}

#[test]
fn slow_and_stalled_clients_do_not_hold_others() {
    let mut d = Daemon::start();
    let disk = d.disk();
    // A byte at a time, the fd with the first byte of the CDB.
    {
        let mut s = connect(&d.sock);
        read_features(&mut s);
        let mut bytes = vec![0u8; 4];
        bytes.extend(frame(register(24), &register_params(9)));
        for (i, b) in bytes.iter().enumerate() {
            let fds = [disk.as_fd()];
            send_frame(&s, &[*b], if i == 4 { &fds } else { &[] });
            std::thread::sleep(Duration::from_millis(2));
            if i % 8 == 0 {
                // Others are served meanwhile.
                d.assert_serves();
            }
        }
        let o = read_reply(&mut s);
        assert_eq!(o.sense_code(), (0x0b, 0x00, 0x06));
        drop(s);
        d.assert_healthy("a byte at a time");
    }
    // Frames that are never finished, in every phase; all held at once.
    let stalled: Vec<UnixStream> = (0..3)
        .map(|phase| {
            let s = connect(&d.sock);
            match phase {
                0 => send_frame(&s, &[0, 0], &[]),
                1 => {
                    send_frame(&s, &[0; 4], &[]);
                    send_frame(&s, &[0x5f, 0], &[disk.as_fd()]);
                }
                _ => {
                    send_frame(&s, &[0; 4], &[]);
                    send_frame(&s, &frame(register(24), &[0u8; 10]), &[disk.as_fd()]);
                }
            }
            s
        })
        .collect();
    for _ in 0..3 {
        d.assert_serves();
    }
    drop(stalled);
    d.assert_healthy("stalled frames");
    // A client that sends a request and vanishes before its answer.
    for _ in 0..20 {
        let s = d.client();
        send_frame(&s, &read_keys(8192), &[disk.as_fd()]);
        drop(s);
    }
    d.assert_healthy("vanished before the answer");
    // A client that pipelines a second request behind the first one.
    {
        let mut s = d.client();
        let mut two = read_keys(8192).to_vec();
        two.extend(read_keys(8192));
        send_frame(&s, &two, &[disk.as_fd()]);
        // The first is answered; the second has no fd and closes the connection.
        let _ = read_reply(&mut s);
        assert_eq!(read_reply(&mut s), Reply::Closed);
        d.assert_healthy("pipelined request without its fd");
    }
    // A client that never reads its answers.
    {
        let s = d.client();
        for _ in 0..50 {
            send_frame(&s, &read_keys(8192), &[disk.as_fd()]);
        }
        d.assert_serves();
        drop(s);
        d.assert_healthy("never reads");
    }
    eprintln!("slow clients: {} cases", d.cases);
}

#[test]
fn a_thousand_connections_held_open() {
    const N: usize = 1000;
    let got = raise_own_nofile(3 * N as u64 + 200);
    assert!(
        got >= 2 * N as u64 + 100,
        "cannot raise RLIMIT_NOFILE: {got}"
    );
    let mut d = Daemon::start();
    // Started with a soft limit of 1024, reservd raised its own.
    let soft = nofile_soft(d.pid());
    assert!(
        soft > N as u64 + 64,
        "reservd's soft open-file limit {soft}"
    );
    let disk = d.disk();
    let before = rss_kb(d.pid());
    let mut peak = Vec::new();
    // Twice: the second round must reuse what the first one allocated.
    for round in 1..=2 {
        let mut conns: Vec<UnixStream> = (0..N).map(|_| d.client()).collect();
        // Each of them is served while all are held, one after the other
        // (so that the crew of threads stays small and the memory figures are
        // the connections').
        for s in conns.iter_mut() {
            send_frame(s, &read_keys(8192), &[disk.as_fd()]);
            assert_eq!(read_reply(s).sense_code(), (0x0b, 0x00, 0x06));
        }
        let fds = d.settled_fds(Some(d.base_fds + N));
        assert_eq!(fds, d.base_fds + N);
        d.assert_serves();
        let held = rss_kb(d.pid());
        eprintln!(
            "round {round}, {N} connections: VmRSS {before} kB -> {held} kB \
             ({:.1} kB per connection), {} threads, soft RLIMIT_NOFILE {soft}",
            (held.saturating_sub(before)) as f64 / N as f64,
            proc_status(d.pid(), "Threads")
        );
        peak.push(held);
        drop(conns);
        d.assert_healthy(&format!("{N} connections, round {round}"));
    }
    assert!(
        peak[1] <= peak[0] + 512,
        "VmRSS grew from {} kB to {} kB between two rounds",
        peak[0],
        peak[1]
    );
    // All at once: 1000 commands in a burst. The crew grows (each idle
    // thread exits after 30 s), so only the fds are checked afterwards.
    let mut conns: Vec<UnixStream> = (0..N).map(|_| d.client()).collect();
    for s in conns.iter_mut() {
        send_frame(s, &read_keys(8192), &[disk.as_fd()]);
    }
    for s in conns.iter_mut() {
        assert_eq!(read_reply(s).sense_code(), (0x0b, 0x00, 0x06));
    }
    eprintln!(
        "burst of {N}: VmRSS {} kB, {} threads",
        rss_kb(d.pid()),
        proc_status(d.pid(), "Threads")
    );
    drop(conns);
    d.assert_serves();
    assert_eq!(d.settled_fds(Some(d.base_fds)), d.base_fds);
}

// ------------------------------------------------------------ in-process

/// Counts what reaches the device; answers from an emulated target.
struct Counting {
    inner: Emulated,
    executed: AtomicUsize,
}

impl PrBackend for Counting {
    fn execute(&self, cmd: &PrCommand<'_>) -> Result<Answer, BackendError> {
        self.executed.fetch_add(1, Ordering::SeqCst);
        self.inner.execute(cmd)
    }
    fn disconnect(&self, nexus: Nexus) {
        self.inner.disconnect(nexus)
    }
}

/// Every malformed frame of the cases above, as (handshake, bytes, fds).
fn malformed(disk: BorrowedFd<'_>) -> Vec<(u32, Vec<u8>, Vec<BorrowedFd<'_>>)> {
    let mut v = vec![
        (1, vec![], vec![]),
        (0xffff_ffff, vec![], vec![]),
        (0, read_keys(8192).to_vec(), vec![]),
        (0, read_keys(8192).to_vec(), vec![disk, disk]),
        (0, read_keys(8192).to_vec(), vec![disk; 10]),
        (0, read_keys(8193).to_vec(), vec![disk]),
        (0, read_keys(0xffff).to_vec(), vec![disk]),
        (0, prout_len(8193).to_vec(), vec![disk]),
        (0, prout_len(0xffff_ffff).to_vec(), vec![disk]),
    ];
    for op in [0x00u8, 0x12, 0xff] {
        v.push((0, cdb(&[op]).to_vec(), vec![disk]));
    }
    let whole = frame(register(24), &register_params(7));
    for cut in 1..whole.len() {
        v.push((0, whole[..cut].to_vec(), vec![disk]));
    }
    v
}

#[test]
fn malformed_requests_never_reach_the_backend() {
    let backend = Arc::new(Counting {
        inner: Emulated::new(),
        executed: AtomicUsize::new(0),
    });
    let server = reservd_testkit::server::TestServer::start(
        backend.clone(),
        reservd_testkit::server::test_config(),
    );
    let disk = reservd_testkit::disks::Disk::new();
    let cases = malformed(disk.fd());
    for (requested, bytes, fds) in &cases {
        let mut s = server.raw();
        read_hello(&mut s);
        s.write_all(&requested.to_be_bytes()).unwrap();
        send_frame(&s, bytes, fds);
        let _ = s.shutdown(Shutdown::Write);
        assert_closed(&mut s);
    }
    assert_eq!(backend.executed.load(Ordering::SeqCst), 0);
    server.assert_serves();
    assert_eq!(backend.executed.load(Ordering::SeqCst), 1);
    eprintln!("in-process malformed cases: {}", cases.len());
}

#[test]
fn a_hung_device_holds_only_its_own_clients() {
    let (gate, _open, server) =
        reservd_testkit::server::gated_server(reservd_testkit::server::test_config());
    let disk = reservd_testkit::disks::Disk::new();
    // Four clients whose commands hang on the device.
    let mut hung: Vec<UnixStream> = (0..4)
        .map(|_| {
            let s = server.ready();
            send_frame(
                &s,
                &reservd_testkit::server::held(cdb_in(0, 8192)),
                &[disk.fd()],
            );
            s
        })
        .collect();
    gate.wait_for_held(4);
    // Others are served meanwhile, repeatedly.
    for _ in 0..10 {
        server.assert_serves();
    }
    // Two of the hung clients give up and vanish.
    hung.truncate(2);
    server.assert_serves();
    // The device comes back (its timeout expired): the remaining two get
    // their answers, the vanished ones are dropped quietly.
    gate.open();
    for s in hung.iter_mut() {
        let a = read_answer(s).expect("an answer after the device returns");
        assert_eq!(a.status.0, 0);
    }
    server.assert_serves();
}

/// Panics on commands marked in CDB byte 15, as a bug would on device
/// data nobody foresaw; runs the others on an emulated target.
struct PanicsOnMark(Emulated);

const PANIC_MARK: u8 = 0xee;

impl PrBackend for PanicsOnMark {
    fn execute(&self, cmd: &PrCommand<'_>) -> Result<Answer, BackendError> {
        assert!(cmd.cdb[15] != PANIC_MARK, "test backend: marked command");
        self.0.execute(cmd)
    }
}

#[test]
fn a_panicking_command_closes_only_its_connection() {
    let server = reservd_testkit::server::TestServer::start(
        Arc::new(PanicsOnMark(Emulated::new())),
        reservd_testkit::server::test_config(),
    );
    let disk = reservd_testkit::disks::Disk::new();
    let mut other = server.client();
    for round in 0..3 {
        let mut s = server.ready();
        let mut c = cdb_in(0, 8192);
        c[15] = PANIC_MARK;
        send_frame(&s, &c, &[disk.fd()]);
        // No answer: the connection is closed, not left waiting.
        assert_closed(&mut s);
        // A connection opened before, and new ones, are served.
        let a = other
            .execute(&cdb_in(0, 8192), disk.fd(), &[])
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(a.status.0, 0);
        server.assert_serves();
    }
}

#[test]
fn unfinished_frames_time_out_idle_connections_do_not() {
    let backend = Arc::new(Emulated::new());
    let config = Config {
        frame_timeout: Some(Duration::from_millis(300)),
        ..reservd_testkit::server::test_config()
    };
    let server = reservd_testkit::server::TestServer::start(backend, config);
    let disk = reservd_testkit::disks::Disk::new();
    let started = Instant::now();
    // No handshake; half a handshake; half a CDB; half a parameter list.
    let mut stalled = vec![server.raw()];
    let mut s = server.raw();
    read_hello(&mut s);
    s.write_all(&[0, 0]).unwrap();
    stalled.push(s);
    let s = server.ready();
    send_frame(&s, &cdb_in(0, 8192)[..5], &[disk.fd()]);
    stalled.push(s);
    let s = server.ready();
    send_frame(&s, &cdb_out(0, 0, 24), &[disk.fd()]);
    send_frame(&s, &[0u8; 5], &[]);
    stalled.push(s);
    // An idle connection after a handshake, and one after a complete command.
    let mut idle = server.client();
    let r = idle.execute(&cdb_in(0, 8192), disk.fd(), &[]).unwrap();
    assert_eq!(r.status.0, 0);
    let idle2 = server.ready();

    for mut s in stalled {
        let mut buf = [0u8; 8];
        loop {
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) => break,
                Ok(_) => continue, // the server's hello
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("stalled connection not closed: {e}"),
            }
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Twice the timeout later, the idle ones still work.
    std::thread::sleep(Duration::from_millis(300));
    let r = idle.execute(&cdb_in(0, 8192), disk.fd(), &[]).unwrap();
    assert_eq!(r.status.0, 0);
    let mut idle2 = idle2;
    send_frame(&idle2, &cdb_in(0, 8192), &[disk.fd()]);
    assert_eq!(read_answer(&mut idle2).unwrap().status.0, 0);
    server.assert_serves();
}

#[test]
fn hung_commands_beyond_the_cap_queue_without_stalling_the_loop() {
    let (gate, _open, server) = reservd_testkit::server::gated_server(Config {
        max_workers: 2,
        ..reservd_testkit::server::test_config()
    });
    let disk = reservd_testkit::disks::Disk::new();
    let held_cdb = reservd_testkit::server::held(cdb_in(0, 8192));
    // Every worker hangs on the device.
    let mut hung: Vec<UnixStream> = (0..2)
        .map(|_| {
            let s = server.ready();
            send_frame(&s, &held_cdb, &[disk.fd()]);
            s
        })
        .collect();
    gate.wait_for_held(2);
    // The event loop still accepts, handshakes and reads requests; the
    // command waits for a worker.
    let mut waiting = server.ready();
    send_frame(&waiting, &cdb_in(0, 8192), &[disk.fd()]);
    waiting
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    let r = std::io::Read::read(&mut waiting, &mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{r:?}"
    );
    // Malformed clients are still closed at once.
    let mut bad = server.ready();
    send_frame(&bad, &cdb(&[0x12]), &[disk.fd()]);
    assert_closed(&mut bad);
    assert_eq!(gate.held(), 2);
    // The device comes back: everything queued is answered.
    gate.open();
    reservd_testkit::server::set_timeouts(&waiting);
    assert_eq!(read_answer(&mut waiting).unwrap().status.0, 0);
    for s in hung.iter_mut() {
        assert_eq!(read_answer(s).unwrap().status.0, 0);
    }
    server.assert_serves();
}
