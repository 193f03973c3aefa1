//! reservd against qemu-pr-helper, side by side.
//!
//! `prbench host  --reservd BIN --qemu BIN`: the error path (a regular file
//! as the disk: SG_IO fails with ENOTTY and the daemon answers CHECK
//! CONDITION) next to a bare helper (`prbench floor`), on any CPU and on
//! one, start-up time, resident memory idle and with 1,000 idle
//! connections.
//! `prbench guest --reservd BIN --qemu BIN`: inside the VM test bed
//! (`tests/vm/run-vm.sh`): the single-path LIO disk next to raw SG_IO on the
//! same fd, the multipath map (READ KEYS through both daemons, a
//! registration through reservd and mpathpersist), one client while another
//! client's device hangs, start-up and memory with and without
//! libmpathpersist.
//! `prbench maps --reservd BIN --qemu BIN`: inside the VM test bed with more
//! maps (`RESERVD_VM_MAPS=N`): PR IN on map B while map A's PR commands hang
//! (held by the bed's fault injector, `tests/vm/faultpath.py`), and the
//! throughput of PR IN through the maps with 1, 16 and 64 clients.
//!
//! Every figure is printed as one Markdown table row:
//! `| where | figure | reservd | qemu-pr-helper | ratio |`, ratio being
//! reservd / qemu-pr-helper. `scripts/bench.sh` prints the header.
//! Without arguments (as `cargo bench` or `cargo test --benches` run it)
//! the program says how to use it and exits successfully.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use reservd_client::client::Client;
use reservd_daemon::backend::sgio::{sg_io, Transfer};
use reservd_testkit::spawn::{self, Ready};

/// PR IN READ KEYS with an allocation length of 8 KiB, as QEMU sends it
/// for a guest asking with a large buffer.
const READ_KEYS: [u8; 10] = [0x5e, 0x00, 0, 0, 0, 0, 0, 0x20, 0x00, 0];

/// PR OUT REGISTER AND IGNORE EXISTING KEY with a basic parameter list.
const PROUT_REGISTER_IGNORE: [u8; 10] = [0x5f, 0x06, 0, 0, 0, 0, 0, 0, 24, 0];

/// A basic PR OUT parameter list with SERVICE ACTION RESERVATION KEY `k`.
fn sark(k: u64) -> [u8; 24] {
    let mut p = [0u8; 24];
    p[8..16].copy_from_slice(&k.to_be_bytes());
    p
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Reservd,
    Qemu,
    /// `prbench floor`: the least a helper can do per request.
    Floor,
}

struct Opts {
    reservd: PathBuf,
    qemu: PathBuf,
    /// Scales iteration counts and durations (1.0 = default).
    scale: f64,
    /// `maps`: how long map A's PR commands are held.
    hang: Duration,
}

fn usage() -> ! {
    eprintln!(
        "usage: prbench host|guest|maps --reservd BIN --qemu BIN [--scale F] [--hang-ms MS]\n\
         \x20      prbench load SOCKET COUNT  (COUNT error-path requests on one\n\
         \x20      connection to a running daemon, for profiling)\n\
         \x20      prbench floor -k SOCKET  (the least a helper can do: see `floor`)\n\
         (scripts/bench.sh runs both parts and prints the table)"
    );
    std::process::exit(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first().cloned() else {
        usage()
    };
    if mode == "load" {
        return load(&args[1..]);
    }
    if mode == "floor" {
        return floor(&args[1..]);
    }
    if !["host", "guest", "maps"].contains(&mode.as_str()) {
        usage()
    }
    let mut opts = Opts {
        reservd: PathBuf::from("target/release/reservd"),
        qemu: PathBuf::from("/usr/bin/qemu-pr-helper"),
        scale: 1.0,
        hang: Duration::from_millis(1000),
    };
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--reservd" => opts.reservd = PathBuf::from(v),
            "--qemu" => opts.qemu = PathBuf::from(v),
            "--scale" => opts.scale = v.parse().unwrap_or_else(|_| usage()),
            "--hang-ms" => opts.hang = Duration::from_millis(v.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    raise_fd_limit();
    match mode.as_str() {
        "host" => host(&opts),
        "guest" => guest(&opts),
        _ => maps(&opts),
    }
}

/// Send `COUNT` error-path READ KEYS to the daemon at `SOCKET` and print
/// the mean round trip: a fixed load for profiling a daemon started by hand
/// (e.g. under `valgrind --tool=callgrind`).
fn load(args: &[String]) {
    let (Some(sock), Some(n)) = (
        args.first(),
        args.get(1).and_then(|n| n.parse::<u32>().ok()),
    ) else {
        usage()
    };
    let path = std::env::temp_dir().join(format!("prbench-disk-{}", std::process::id()));
    std::fs::write(&path, [0u8; 512]).unwrap();
    let disk = File::open(&path).unwrap();
    let mut c = Client::connect(Path::new(sock)).expect("connect");
    let t = Instant::now();
    for _ in 0..n {
        c.execute(&READ_KEYS, disk.as_fd(), &[]).expect("request");
    }
    println!("{n} requests, mean {}", us(t.elapsed() / n.max(1)));
    let _ = std::fs::remove_file(&path);
}

/// `prbench floor -k SOCKET`: a helper reduced to what every helper must
/// do for a request, for the floor rows of the host part. One thread per
/// connection, blocking: read the CDB with its fd (one `recvmsg`), issue
/// SG_IO on the fd, write the answer, close the fd. No event loop, no
/// checks, no protection against a hung device or a hostile client: never
/// a helper to run, only the bound a helper's own cost is measured against.
fn floor(args: &[String]) {
    use reservd_proto::wire::{encode_response, Request, CDB_SIZE, DATA_SIZE};
    use std::io::Write;
    use std::os::unix::net::{UnixListener, UnixStream};
    let [k, sock] = args else { usage() };
    if k != "-k" {
        usage()
    }
    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock).expect("bind");
    let serve = |mut s: UnixStream| -> std::io::Result<()> {
        use std::io::Read;
        s.write_all(&0u32.to_be_bytes())?;
        let mut features = [0u8; 4];
        s.read_exact(&mut features)?;
        let mut data = vec![0u8; DATA_SIZE];
        loop {
            let mut cdb = [0u8; CDB_SIZE];
            let got = reservd_daemon::server::fdpass::recv_with_fds(s.as_fd(), &mut cdb)?;
            // The clients here send each CDB, with its fd, in one message.
            let (CDB_SIZE, Some(fd)) = (got.len, got.fds.into_iter().next()) else {
                return Ok(());
            };
            let req = Request {
                cdb,
                params: Vec::new(),
            };
            let len = req.max_response_len();
            let (mut answer, n) = sg_io(
                fd.as_fd(),
                &req.cdb[..10],
                Transfer::FromDevice(&mut data[..len]),
                30_000,
            );
            answer.data = data[..n].to_vec();
            s.write_all(&encode_response(&req, &answer))?;
        }
    };
    for s in listener.incoming() {
        let s = s.expect("accept");
        std::thread::spawn(move || {
            let _ = serve(s);
        });
    }
}

// ---------------------------------------------------------------- daemons

struct Daemon {
    d: spawn::Daemon,
    /// Time from spawn to the 4 handshake bytes.
    startup: Duration,
    /// When it was spawned.
    spawned: Instant,
    /// reservd with device-mapper visible: it loads libmpathpersist.
    loads_mpath: bool,
}

impl Daemon {
    #[allow(unsafe_code)] // pre_exec, to hide device-mapper from the child
    fn start(opts: &Opts, kind: Kind, hide_dm: bool) -> Daemon {
        let dir = std::env::temp_dir();
        let tag = match kind {
            Kind::Reservd => "reservd",
            Kind::Qemu => "qemu",
            Kind::Floor => "floor",
        };
        let sock = dir.join(format!("prbench-{tag}-{}.sock", std::process::id()));
        let log = dir.join(format!("prbench-{tag}-{}.log", std::process::id()));
        let me = std::env::current_exe().expect("own path");
        let bin = match kind {
            Kind::Reservd => &opts.reservd,
            Kind::Qemu => &opts.qemu,
            Kind::Floor => &me,
        };
        let mut cmd = Command::new(bin);
        if kind == Kind::Floor {
            cmd.arg("floor");
        }
        cmd.arg("-k").arg(&sock);
        if hide_dm {
            // SAFETY: the closure runs in the forked child before exec and
            // calls only async-signal-safe system calls (unshare, mount)
            // with pointers to static NUL-terminated strings.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::unshare(libc::CLONE_NEWNS) != 0
                        || libc::mount(
                            std::ptr::null(),
                            c"/".as_ptr(),
                            std::ptr::null(),
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        ) != 0
                        || libc::mount(
                            c"none".as_ptr(),
                            c"/dev/mapper".as_ptr(),
                            c"tmpfs".as_ptr(),
                            0,
                            std::ptr::null(),
                        ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // Ready when it answers a connection with its feature bytes.
        let d = spawn::Daemon::start(cmd, &sock, &log, Ready::Hello)
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        Daemon {
            startup: d.spawned.elapsed(),
            spawned: d.spawned,
            d,
            loads_mpath: matches!(kind, Kind::Reservd)
                && !hide_dm
                && std::path::Path::new("/dev/mapper/control").exists(),
        }
    }

    fn client(&self) -> Client {
        self.d.client().expect("connect")
    }

    /// For reservd with device-mapper visible, which loads libmpathpersist
    /// in the background: wait until a library whose path contains `name`
    /// is mapped (gives up quietly after `limit`).
    fn wait_for_mapping(&self, name: &str, limit: Duration) {
        if !self.loads_mpath {
            return;
        }
        let maps = format!("/proc/{}/maps", self.d.pid());
        let t = Instant::now();
        while t.elapsed() < limit {
            if std::fs::read_to_string(&maps).is_ok_and(|m| m.contains(name)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// VmRSS in KiB.
    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.d.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.d.stop();
        let _ = std::fs::remove_file(&self.d.log);
    }
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(65536), hard);
    }
}

// ---------------------------------------------------------------- figures

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[i]
}

struct Lat {
    p50: Duration,
    p99: Duration,
    n: usize,
}

fn lat(mut v: Vec<Duration>) -> Lat {
    v.sort();
    Lat {
        p50: pct(&v, 50.0),
        p99: pct(&v, 99.0),
        n: v.len(),
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "—".into()
    }
}

fn row(place: &str, figure: &str, r: &str, q: &str, ratio: &str) {
    println!("| {place} | {figure} | {r} | {q} | {ratio} |");
}

fn row_d(place: &str, figure: &str, r: Duration, q: Duration) {
    row(
        place,
        figure,
        &us(r),
        &us(q),
        &ratio(r.as_secs_f64(), q.as_secs_f64()),
    );
}

/// The p50 and p99 rows of a READ KEYS round trip through both daemons.
fn round_trip_rows(place: &str, rl: &Lat, ql: &Lat) {
    for (pct, r, q) in [("p50", rl.p50, ql.p50), ("p99", rl.p99, ql.p99)] {
        row_d(
            place,
            &format!("READ KEYS round trip {pct} (n={})", rl.n),
            r,
            q,
        );
    }
}

/// The time of each of `n` calls of `f`, fewer (but at least 50) if
/// `until` passes first.
fn time_calls(n: usize, until: Instant, f: &mut dyn FnMut()) -> Vec<Duration> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n && (v.len() < 50 || Instant::now() < until) {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    v
}

/// `sources` (each makes one READ KEYS: raw SG_IO, or a round trip
/// through a daemon) measured `iters` times each within `limit`, after some
/// unmeasured ones, in two turns each, the second pass in reverse order
/// (A B C, C B A): a drift of the machine during the run then weighs on
/// all alike, where measuring one after the other would favour whichever
/// ran in the quieter moment.
fn measure_in_turns(iters: usize, limit: Duration, sources: &mut [&mut dyn FnMut()]) -> Vec<Lat> {
    let start = Instant::now();
    for s in sources.iter_mut() {
        time_calls(iters.div_ceil(20).min(200), start + limit, *s);
    }
    let turns = 2 * sources.len();
    let mut v: Vec<Vec<Duration>> = sources.iter().map(|_| Vec::new()).collect();
    let order: Vec<usize> = (0..sources.len()).chain((0..sources.len()).rev()).collect();
    for (k, &i) in order.iter().enumerate() {
        let until = start + limit.mul_f64((k + 1) as f64 / turns as f64);
        v[i].extend(time_calls(iters.div_ceil(2), until, sources[i]));
    }
    v.into_iter().map(lat).collect()
}

/// One READ KEYS through `client`.
fn via<'a>(client: &'a mut Client, disk: &'a File) -> impl FnMut() + 'a {
    move || {
        client
            .execute(&READ_KEYS, disk.as_fd(), &[])
            .expect("request");
    }
}

/// One raw SG_IO READ KEYS on `disk`.
fn raw_sg_io(disk: &File) -> impl FnMut() + '_ {
    let mut buf = vec![0u8; 8192];
    move || {
        let (answer, _) = sg_io(
            disk.as_fd(),
            &READ_KEYS,
            Transfer::FromDevice(&mut buf),
            30_000,
        );
        assert_eq!(answer.status.0, 0, "raw READ KEYS failed");
    }
}

/// Requests per second with `n` clients, each on its own connection with
/// its own fd, for `dur`.
fn throughput(d: &Daemon, open: &dyn Fn() -> File, n: usize, dur: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut threads = Vec::new();
    for _ in 0..n {
        let mut c = d.client();
        let f = open();
        let (stop, count, barrier) = (stop.clone(), count.clone(), barrier.clone());
        threads.push(
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    barrier.wait();
                    let mut k = 0;
                    while !stop.load(Ordering::Relaxed) {
                        c.execute(&READ_KEYS, f.as_fd(), &[]).expect("request");
                        k += 1;
                    }
                    count.fetch_add(k, Ordering::Relaxed);
                })
                .unwrap(),
        );
    }
    barrier.wait();
    let t = Instant::now();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        th.join().unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

/// reservd and qemu-pr-helper, each checked to answer READ KEYS on `disk`
/// (`what`, for the message) with `status`.
fn start_both(opts: &Opts, disk: &File, status: u8, what: &str) -> (Daemon, Daemon) {
    let r = Daemon::start(opts, Kind::Reservd, false);
    let q = Daemon::start(opts, Kind::Qemu, false);
    for d in [&r, &q] {
        let a = d.client().execute(&READ_KEYS, disk.as_fd(), &[]).unwrap();
        assert_eq!(a.status.0, status, "READ KEYS on {what}: {a:?}");
    }
    (r, q)
}

/// Median start-up time over `n` starts, and idle RSS of the last one.
fn startup(opts: &Opts, kind: Kind, hide_dm: bool, n: usize) -> (Duration, u64) {
    let mut v = Vec::new();
    let mut rss = 0;
    for i in 0..n {
        let d = Daemon::start(opts, kind, hide_dm);
        v.push(d.startup);
        if i == n - 1 {
            // Let the first connection's teardown settle, and reservd's
            // background load of libmpathpersist finish (when it has one).
            std::thread::sleep(Duration::from_millis(100));
            d.wait_for_mapping("libmpathpersist", Duration::from_secs(5));
            rss = d.rss_kib();
        }
    }
    v.sort();
    (v[v.len() / 2], rss)
}

/// Median over `n` starts of the time from spawn to the answer of the
/// first READ KEYS on `map` (a multipath map): with reservd this includes
/// loading libmpathpersist.
fn first_map_answer(opts: &Opts, kind: Kind, map: &File, n: usize) -> Duration {
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let d = Daemon::start(opts, kind, false);
            let a = d.client().execute(&READ_KEYS, map.as_fd(), &[]).unwrap();
            let t = d.spawned.elapsed();
            assert_eq!(a.status.0, 0, "READ KEYS on the map: {a:?}");
            t
        })
        .collect();
    v.sort();
    v[v.len() / 2]
}

/// RSS idle and with `n` idle connections (handshake done).
fn conn_memory(opts: &Opts, kind: Kind, n: usize) -> (u64, u64) {
    let d = Daemon::start(opts, kind, false);
    std::thread::sleep(Duration::from_millis(100));
    d.wait_for_mapping("libmpathpersist", Duration::from_secs(5));
    let idle = d.rss_kib();
    let clients: Vec<Client> = (0..n).map(|_| d.client()).collect();
    // Every connection has been accepted once the last one got its hello;
    // give the daemon a moment to take in the feature words.
    std::thread::sleep(Duration::from_millis(300));
    let loaded = d.rss_kib();
    drop(clients);
    (idle, loaded)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn memory_rows(place: &str, opts: &Opts, reservd_label: &str) {
    const N: usize = 1000;
    let (ri, rl) = conn_memory(opts, Kind::Reservd, N);
    let (qi, ql) = conn_memory(opts, Kind::Qemu, N);
    row(
        place,
        &format!("RSS with {N} idle connections{reservd_label}"),
        &mib(rl),
        &mib(ql),
        &ratio(rl as f64, ql as f64),
    );
    let rg = (rl.saturating_sub(ri)) as f64 / N as f64;
    let qg = (ql.saturating_sub(qi)) as f64 / N as f64;
    row(
        place,
        &format!("RSS growth per connection{reservd_label} (target < 10 KiB)"),
        &format!("{rg:.2} KiB"),
        &format!("{qg:.2} KiB"),
        &ratio(rg, qg),
    );
}

fn startup_rows(place: &str, opts: &Opts, n: usize, with_mpath: bool) {
    let (qt, qr) = startup(opts, Kind::Qemu, false, n);
    let (rt, rr) = startup(opts, Kind::Reservd, false, n);
    let label = if with_mpath {
        " (reservd: libmpathpersist loaded in the background once serving)"
    } else {
        " (reservd: multipath inactive, no device-mapper)"
    };
    row_d(
        place,
        &format!("start-up, exec → handshake (median of {n}){label}"),
        rt,
        qt,
    );
    row(
        place,
        &format!("RSS idle{label}"),
        &mib(rr),
        &mib(qr),
        &ratio(rr as f64, qr as f64),
    );
    if with_mpath {
        let map = open_dev(&env("RESERVD_MP_DEV"));
        let rf = first_map_answer(opts, Kind::Reservd, &map, n);
        let qf = first_map_answer(opts, Kind::Qemu, &map, n);
        row_d(
            place,
            &format!(
                "start-up, exec → first READ KEYS answered on the multipath map (median of {n}) \
                 (reservd: libmpathpersist loaded first; qemu-pr-helper: SG_IO on the map)"
            ),
            rf,
            qf,
        );
        let (rt2, rr2) = startup(opts, Kind::Reservd, true, n);
        let label = " (reservd: device-mapper hidden, libmpathpersist not loaded)";
        row_d(
            place,
            &format!("start-up, exec → handshake (median of {n}){label}"),
            rt2,
            qt,
        );
        row(
            place,
            &format!("RSS idle{label}"),
            &mib(rr2),
            &mib(qr),
            &ratio(rr2 as f64, qr as f64),
        );
    }
}

fn scaled(opts: &Opts, n: usize) -> usize {
    ((n as f64 * opts.scale) as usize).max(100)
}

fn scaled_d(opts: &Opts, d: Duration) -> Duration {
    d.mul_f64(opts.scale)
}

// ---------------------------------------------------------------- host

fn host(opts: &Opts) {
    let place = "host, error path";
    let path = std::env::temp_dir().join(format!("prbench-disk-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap()
    };
    let disk = open();
    let iters = scaled(opts, 20_000);

    // Sanity: the answer is CHECK CONDITION from both.
    let (r, q) = start_both(opts, &disk, 2, "a regular file");
    host_round_trips(opts, place, &r, &q, &disk, iters);
    for n in [1, 16, 256] {
        let dur = scaled_d(opts, Duration::from_secs(2));
        let rt = throughput(&r, &open, n, dur);
        let qt = throughput(&q, &open, n, dur);
        row(
            place,
            &format!("throughput, {n} client(s)"),
            &format!("{rt:.0} req/s"),
            &format!("{qt:.0} req/s"),
            &ratio(rt, qt),
        );
    }
    drop((r, q));

    // The same round trips with the client and every daemon's threads on
    // one CPU: no wake-up crosses CPUs, so the figures are the daemons' own
    // cost (on a virtual machine, waking an idle virtual CPU can take
    // longer than a whole round trip, and whether it is needed depends on
    // where the scheduler put each thread).
    let all = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    let mut one = nix::sched::CpuSet::new();
    let cpu = (0..nix::sched::CpuSet::count())
        .find(|&c| all.is_set(c).unwrap_or(false))
        .expect("a CPU");
    one.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("pin");
    // Started while pinned: every thread they start inherits the CPU.
    let (r, q) = start_both(opts, &disk, 2, "a regular file");
    host_round_trips(opts, &format!("{place}, one CPU"), &r, &q, &disk, iters);
    drop((r, q));
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &all).expect("unpin");

    startup_rows("host", opts, 21, false);
    memory_rows("host", opts, "");
    let _ = std::fs::remove_file(&path);
}

/// READ KEYS round trips through reservd, qemu-pr-helper and the floor
/// (`prbench floor`, started here), measured in turns: the rows of both
/// daemons, then the floor's against qemu-pr-helper's.
fn host_round_trips(opts: &Opts, place: &str, r: &Daemon, q: &Daemon, disk: &File, iters: usize) {
    let f = Daemon::start(opts, Kind::Floor, false);
    let (mut rc, mut qc, mut fc) = (r.client(), q.client(), f.client());
    let a = fc.execute(&READ_KEYS, disk.as_fd(), &[]).unwrap();
    assert_eq!(a.status.0, 2, "floor's READ KEYS on a regular file: {a:?}");
    let l = measure_in_turns(
        iters,
        Duration::from_secs(30),
        &mut [
            &mut via(&mut rc, disk),
            &mut via(&mut qc, disk),
            &mut via(&mut fc, disk),
        ],
    );
    round_trip_rows(place, &l[0], &l[1]);
    for (pct, fl, ql) in [("p50", l[2].p50, l[1].p50), ("p99", l[2].p99, l[1].p99)] {
        row_d(
            place,
            &format!(
                "floor (`prbench floor`, a bare helper; in the reservd column): \
                 READ KEYS round trip {pct} (n={})",
                l[2].n
            ),
            fl,
            ql,
        );
    }
}

// ---------------------------------------------------------------- guest

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set: run inside tests/vm/run-vm.sh"))
}

fn open_dev(p: &str) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// A dm-multipath map with no paths: with `queue_if_no_path` SG_IO on it
/// waits (the kernel retries the ioctl until a path appears), without it
/// SG_IO fails at once.
struct HangMap {
    name: String,
    dev: String,
}

fn dmsetup(args: &[&str]) {
    let st = Command::new("dmsetup")
        .args(args)
        .stdin(Stdio::null())
        .status()
        .expect("dmsetup");
    assert!(st.success(), "dmsetup {args:?}: {st}");
}

impl HangMap {
    /// The map has one path, `path` (claimed, but still usable through
    /// its own node), which is failed at once.
    fn create(path: &str) -> HangMap {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(path).unwrap().rdev();
        let dev_t = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
        let name = format!("prbench-hang-{}", std::process::id());
        let table = format!("0 8 multipath 0 0 1 1 round-robin 0 1 1 {dev_t} 1000");
        // Created without queueing, so that udev's probe of the new disk returns.
        dmsetup(&["create", &name, "--table", &table]);
        let _ = Command::new("udevadm")
            .args(["settle", "-t", "10"])
            .status();
        dmsetup(&["mknodes", &name]);
        dmsetup(&["message", &name, "0", &format!("fail_path {dev_t}")]);
        let dev = format!("/dev/mapper/{name}");
        HangMap { name, dev }
    }

    fn queue(&self, on: bool) {
        let msg = if on {
            "queue_if_no_path"
        } else {
            "fail_if_no_path"
        };
        dmsetup(&["message", &self.name, "0", msg]);
    }

    /// SG_IO on the map must wait while queueing, and return once the map
    /// fails instead.
    fn verify(&self, fd: &File) {
        self.queue(true);
        let t = spawn_read_keys(fd);
        std::thread::sleep(Duration::from_millis(500));
        let hung = !t.is_finished();
        self.queue(false);
        let status = t.join().unwrap();
        assert!(hung, "SG_IO on {} did not wait", self.dev);
        eprintln!(
            "{}: SG_IO waits while the map queues; status {status:#04x} once it fails (verified)",
            self.dev
        );
    }
}

/// Raw SG_IO READ KEYS on `fd` in a thread of its own; the thread returns
/// the SCSI status.
fn spawn_read_keys(fd: &File) -> std::thread::JoinHandle<u8> {
    let f = fd.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 8192];
        sg_io(
            f.as_fd(),
            &READ_KEYS,
            Transfer::FromDevice(&mut buf),
            30_000,
        )
        .0
        .status
        .0
    })
}

impl Drop for HangMap {
    fn drop(&mut self) {
        self.queue(false);
        let _ = Command::new("dmsetup")
            .args(["remove", "--retry", &self.name])
            .status();
    }
}

/// Run `b` for 200 ms, unmeasured.
fn warm(b: &mut dyn FnMut()) {
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until {
        b();
    }
}

/// Client B's latency (`b`) without and with a hung command of client A
/// (`start_a` issues it on the hanging map), in alternating phases so that a
/// drift of the machine weighs on both alike. Each phase starts with
/// 200 ms of unmeasured requests: after B has been idle (the 300 ms in
/// which A's command is seen to hang, the release of the previous hang),
/// its first ~50 ms of requests in this guest take up to several ms each,
/// with or without a daemon; measured, they would make the p99 of
/// whichever phase follows the idle time. Eight phases: the hung command's
/// thread wakes every ~20 ms in the kernel (dm retries the ioctl), costing
/// the request it meets tens of µs in this guest, and at ~5 requests per
/// ms that is about 1 request in 100: the p99 sits on the edge of that
/// population, and wants thousands of samples to be stable.
///
/// `pid` is the process whose thread A's command hangs in (the daemon, or
/// this one for the control): its threads asleep in state D are watched
/// while B is measured, to tell what the hung ioctl's retries cost.
fn hang_phases<T>(
    hang: &HangMap,
    pid: u32,
    start_a: &mut dyn FnMut() -> std::thread::JoinHandle<T>,
    b: &mut dyn FnMut(),
    iters: usize,
    limit: Duration,
) -> Hang {
    const PHASES: u32 = 8;
    let per = iters.div_ceil(PHASES as usize);
    let phase_limit = limit / PHASES;
    let (mut base, mut during) = (Vec::new(), Vec::new());
    let (mut wakes, mut cpu, mut watched) = (0, Duration::ZERO, Duration::ZERO);
    for _ in 0..PHASES {
        warm(b);
        base.extend(time_calls(per, Instant::now() + phase_limit, b));
        hang.queue(true);
        let a = start_a();
        std::thread::sleep(Duration::from_millis(300));
        assert!(!a.is_finished(), "client A's command did not hang");
        warm(b);
        let asleep = sleeping_threads(pid);
        let t = Instant::now();
        during.extend(time_calls(per, Instant::now() + phase_limit, b));
        watched += t.elapsed();
        for (tid, (run, slices)) in asleep {
            if let Some((run2, slices2)) = schedstat(pid, tid) {
                cpu += Duration::from_nanos(run2 - run);
                wakes += slices2 - slices;
            }
        }
        let still = !a.is_finished();
        hang.queue(false);
        a.join().unwrap();
        assert!(still, "client A was answered during the phase");
    }
    let base_lat = lat(base.clone());
    let slow = 2 * base_lat.p50;
    let over = |v: &[Duration]| v.iter().filter(|&&d| d > slow).count() as f64 / v.len() as f64;
    Hang {
        slow_share: (over(&base), over(&during)),
        base: base_lat,
        during: lat(during),
        wakes_per_s: wakes as f64 / watched.as_secs_f64(),
        cpu_per_wake: cpu / wakes.max(1) as u32,
    }
}

/// B's latency without and with A's command hanging, and what A's thread
/// did in the kernel meanwhile.
struct Hang {
    base: Lat,
    during: Lat,
    /// B's requests slower than twice its p50 without the hang: their
    /// share without, and with.
    slow_share: (f64, f64),
    /// How often threads asleep in state D (A's) ran, and the CPU each run
    /// took.
    wakes_per_s: f64,
    cpu_per_wake: Duration,
}

impl Hang {
    /// B's p50 and p99 with the hang, each divided by its figure without.
    fn slowdown(&self) -> String {
        format!(
            "{:.2} / {:.2}",
            self.during.p50.as_secs_f64() / self.base.p50.as_secs_f64(),
            self.during.p99.as_secs_f64() / self.base.p99.as_secs_f64()
        )
    }

    fn slow_share_text(&self) -> String {
        format!(
            "{:.1}% → {:.1}%",
            self.slow_share.0 * 100.0,
            self.slow_share.1 * 100.0
        )
    }

    fn kernel_text(&self) -> String {
        format!(
            "{:.0} runs/s, {} CPU each",
            self.wakes_per_s,
            us(self.cpu_per_wake)
        )
    }
}

/// CPU time (ns) and times run of thread `tid` of `pid`.
fn schedstat(pid: u32, tid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
    let f: Vec<u64> = s
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    (f.len() == 3).then(|| (f[0], f[2]))
}

/// The threads of `pid` in uninterruptible sleep (where a hung SG_IO
/// waits), with their `schedstat`.
fn sleeping_threads(pid: u32) -> Vec<(u32, (u64, u64))> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        if state == Some("D") {
            if let Some(ss) = schedstat(pid, tid) {
                v.push((tid, ss));
            }
        }
    }
    v
}

fn guest(opts: &Opts) {
    let place = "VM, single-path LIO disk";
    let sp = env("RESERVD_SP_DEV");
    let mp = env("RESERVD_MP_DEV");
    let disk = open_dev(&sp);
    let iters = scaled(opts, 2000);
    let limit = scaled_d(opts, Duration::from_secs(8));

    let (r, q) = start_both(opts, &disk, 0, &sp);
    let (mut rc, mut qc) = (r.client(), q.client());
    let l = measure_in_turns(
        iters,
        limit * 3,
        &mut [
            &mut raw_sg_io(&disk),
            &mut via(&mut rc, &disk),
            &mut via(&mut qc, &disk),
        ],
    );
    let (raw, rl, ql) = (&l[0], &l[1], &l[2]);
    row(
        place,
        &format!("raw SG_IO READ KEYS p50 / p99 (device floor, n={})", raw.n),
        &format!("{} / {}", us(raw.p50), us(raw.p99)),
        &format!("{} / {}", us(raw.p50), us(raw.p99)),
        "—",
    );
    round_trip_rows(place, rl, ql);
    let ro = rl.p50.saturating_sub(raw.p50);
    let qo = ql.p50.saturating_sub(raw.p50);
    row_d(
        place,
        "overhead p50 = daemon − raw (target: ≤ 0.5 ratio)",
        ro,
        qo,
    );
    for n in [1, 16, 256] {
        let dur = scaled_d(opts, Duration::from_secs(2));
        let open = || open_dev(&sp);
        let rt = throughput(&r, &open, n, dur);
        let qt = throughput(&q, &open, n, dur);
        row(
            place,
            &format!("throughput, {n} client(s)"),
            &format!("{rt:.0} req/s"),
            &format!("{qt:.0} req/s"),
            &ratio(rt, qt),
        );
    }

    // Multipath: the map registered (as a cluster node's is), through both
    // daemons, next to raw SG_IO on the map. Debian's qemu-pr-helper has no
    // multipath support: it sends SG_IO to the map, as reservd does for PR
    // IN; reservd then lists the map's key once (multipathd's answer cached).
    let mpd = open_dev(&mp);
    let key = 0x0be0_c400_0000_0001u64;
    let register = |d: &Daemon, sa_key: u64| {
        let a = d
            .client()
            .execute(&PROUT_REGISTER_IGNORE, mpd.as_fd(), &sark(sa_key))
            .unwrap();
        assert_eq!(a.status.0, 0, "REGISTER AND IGNORE on the map: {a:?}");
    };
    register(&r, key);
    let (mut rc, mut qc) = (r.client(), q.client());
    let l = measure_in_turns(
        iters,
        limit * 3,
        &mut [
            &mut raw_sg_io(&mpd),
            &mut via(&mut rc, &mpd),
            &mut via(&mut qc, &mpd),
        ],
    );
    let (mraw, rl, ql) = (&l[0], &l[1], &l[2]);
    let mplace = "VM, multipath map";
    row(
        mplace,
        &format!(
            "raw SG_IO READ KEYS on {mp} p50 / p99 (device floor, n={})",
            mraw.n
        ),
        &format!("{} / {}", us(mraw.p50), us(mraw.p99)),
        &format!("{} / {}", us(mraw.p50), us(mraw.p99)),
        "—",
    );
    round_trip_rows(
        &format!("{mplace} (target: p50 ≤ 1.5 ratio; qemu-pr-helper: SG_IO on the map)"),
        rl,
        ql,
    );
    // PR OUT: a registration through reservd (state read, then
    // libmpathpersist on every path, then multipathd's key) against
    // mpathpersist doing the same (a process: start-up, configuration,
    // path discovery, then the same library call).
    let n = scaled(opts, 10).max(3);
    let mut t_r = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        register(&r, key);
        t_r.push(t.elapsed());
    }
    let mut t_m = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let st = Command::new("mpathpersist")
            .args([
                "--out",
                "--register-ignore",
                &format!("--param-sark={key:x}"),
                &mp,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("mpathpersist");
        t_m.push(t.elapsed());
        assert!(st.success(), "mpathpersist --out --register-ignore: {st}");
    }
    let (lr, lm) = (lat(t_r), lat(t_m));
    row(
        mplace,
        &format!("REGISTER AND IGNORE p50 (n={n}): reservd | mpathpersist process"),
        &us(lr.p50),
        &us(lm.p50),
        &ratio(lr.p50.as_secs_f64(), lm.p50.as_secs_f64()),
    );
    register(&r, 0);
    drop((rc, qc));

    // One client's device hangs; another's latency meanwhile. The hanging
    // device is a dm-multipath map whose only path failed and that queues
    // I/O (its path is the single-path disk, which B keeps using): SG_IO on
    // it waits until the map is told to fail (the SCSI device state
    // `blocked` cannot be set through sysfs on this kernel). reservd runs
    // without device-mapper access here, so it too sends SG_IO to the map
    // (with libmpathpersist it would ask multipathd, which knows no such
    // map, and fail at once). The control: the same hung SG_IO issued
    // directly, next to raw SG_IO for B, is what the machine itself loses
    // while that SG_IO waits in the kernel.
    drop(r);
    let r = Daemon::start(opts, Kind::Reservd, true);
    let hang = HangMap::create(&sp);
    let hang_fd = open_dev(&hang.dev);
    hang.verify(&hang_fd);
    // Twice the samples of the other rows (see `hang_phases`).
    let (hang_iters, hang_limit) = (2 * iters, 2 * limit);
    let mut h = Vec::new();
    for d in [&r, &q] {
        let mut b = d.client();
        h.push(hang_phases(
            &hang,
            d.d.pid(),
            &mut || {
                let mut a = d.client();
                let hf = hang_fd.try_clone().unwrap();
                std::thread::spawn(move || {
                    let _ = a.execute(&READ_KEYS, hf.as_fd(), &[]);
                })
            },
            &mut via(&mut b, &disk),
            hang_iters,
            hang_limit,
        ));
    }
    let raw = hang_phases(
        &hang,
        std::process::id(),
        &mut || spawn_read_keys(&hang_fd),
        &mut raw_sg_io(&disk),
        hang_iters,
        hang_limit,
    );
    let n = h[0].base.n;
    row_d(
        place,
        &format!("client B p50, no hang (n={n})"),
        h[0].base.p50,
        h[1].base.p50,
    );
    row_d(
        place,
        &format!("client B p99, no hang (n={n})"),
        h[0].base.p99,
        h[1].base.p99,
    );
    row_d(
        place,
        &format!("client B p50 while client A's device hangs (n={n})"),
        h[0].during.p50,
        h[1].during.p50,
    );
    row_d(
        place,
        &format!("client B p99 while client A's device hangs (n={n})"),
        h[0].during.p99,
        h[1].during.p99,
    );
    for (figure, text) in [
        (
            "client B p50 / p99, hang ÷ no hang (target: no slowdown)",
            Hang::slowdown as fn(&Hang) -> String,
        ),
        (
            "client B requests over twice its no-hang p50: no hang → hang",
            Hang::slow_share_text,
        ),
        (
            "client A's hung SG_IO: its thread's runs in the kernel (dm retries the ioctl)",
            Hang::kernel_text,
        ),
    ] {
        row(place, figure, &text(&h[0]), &text(&h[1]), "—");
    }
    let control = format!(
        "{} / {} → {} / {} ({}); over twice p50 {}; A's thread {}",
        us(raw.base.p50),
        us(raw.base.p99),
        us(raw.during.p50),
        us(raw.during.p99),
        raw.slowdown(),
        raw.slow_share_text(),
        raw.kernel_text()
    );
    row(
        place,
        &format!(
            "control, no daemon: raw SG_IO p50 / p99 for B, no hang → A's SG_IO hung (n={})",
            raw.during.n
        ),
        &control,
        &control,
        "—",
    );
    drop(hang_fd);
    drop(hang);
    drop((r, q));
    startup_rows("VM", opts, 11, true);
    memory_rows("VM", opts, " (reservd: libmpathpersist loaded)");
}

// ---------------------------------------------------------------- maps

/// A multipath map of the bed.
struct Map {
    dev: String,
    paths: Vec<String>,
}

/// The maps of a bed booted with `RESERVD_VM_MAPS=N`, mpatha first.
fn bed_maps() -> Vec<Map> {
    let devs = env("RESERVD_MAPS_DEVS");
    let paths = env("RESERVD_MAPS_PATHS");
    devs.split_whitespace()
        .zip(paths.split_whitespace())
        .map(|(d, p)| Map {
            dev: d.to_string(),
            paths: p.split(',').map(String::from).collect(),
        })
        .collect()
}

/// A path added to a map by the bed's fault injector
/// (`tests/vm/faultpath.py`): its PR commands can be held back.
struct FaultPath {
    ctl: PathBuf,
    dev: String,
}

impl FaultPath {
    fn add(map: &str, name: &str) -> FaultPath {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm/faultpath.py");
        let out = Command::new(&script)
            .args(["add", map, name])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
        assert!(out.status.success(), "faultpath.py add {map} {name} failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let var = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("faultpath.py printed no {k}: {text}"))
                .to_string()
        };
        FaultPath {
            ctl: var("FAULTPATH_CTL").into(),
            dev: var("FAULTPATH_DEV"),
        }
    }

    /// Hold the path's PR commands for `d` (zero: pass them on at once).
    fn hold(&self, d: Duration) {
        let tmp = self.ctl.with_extension("tmp");
        std::fs::write(&tmp, format!("delay={} ops=pr\n", d.as_millis())).unwrap();
        std::fs::rename(&tmp, &self.ctl).unwrap();
    }
}

/// multipathd's view of path `dev` ("dm_state checker_state").
fn mp_path_state(dev: &str) -> String {
    let out = Command::new("multipathd")
        .args(["show", "paths", "raw", "format", "%d %t %T"])
        .stdin(Stdio::null())
        .output()
        .expect("multipathd");
    let name = dev.trim_start_matches("/dev/");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(name)
                .filter(|r| r.starts_with(' '))
                .map(|r| r.trim().to_string())
        })
        .unwrap_or_default()
}

fn wait_path_state(dev: &str, want: &str) {
    let t = Instant::now();
    loop {
        let st = mp_path_state(dev);
        if st.starts_with(want) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{dev}: multipathd says '{st}', expected '{want}'"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A client sending READ KEYS on one device in a loop, each request timed.
struct Looper {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Vec<(Instant, Duration)>>,
}

impl Looper {
    fn start(d: &Daemon, dev: &str) -> Looper {
        let mut c = d.client();
        let f = open_dev(dev);
        let dev = dev.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let mut v = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                let a = c.execute(&READ_KEYS, f.as_fd(), &[]).expect("request");
                v.push((t, t.elapsed()));
                assert_eq!(a.status.0, 0, "READ KEYS on {dev}: {a:?}");
                n.fetch_add(1, Ordering::Relaxed);
            }
            v
        });
        Looper { stop, done, thread }
    }

    /// Wait until this client has had `k` more answers (at most `limit`).
    fn wait_answers(&self, k: u64, limit: Duration) {
        let n0 = self.done.load(Ordering::Relaxed);
        let t = Instant::now();
        while self.done.load(Ordering::Relaxed) < n0 + k {
            assert!(t.elapsed() < limit, "no answer within {limit:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(self) -> Vec<(Instant, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The latencies of the requests that started and ended within one of
/// `windows`.
fn in_windows(v: &[(Instant, Duration)], windows: &[(Instant, Instant)]) -> Vec<Duration> {
    v.iter()
        .filter(|&&(t, d)| windows.iter().any(|&(a, b)| t >= a && t + d <= b))
        .map(|&(_, d)| d)
        .collect()
}

fn lat_or_zero(v: Vec<Duration>) -> Lat {
    if v.is_empty() {
        Lat {
            p50: Duration::ZERO,
            p99: Duration::ZERO,
            n: 0,
        }
    } else {
        lat(v)
    }
}

/// Map B's latency alone, with clients busy on map A and the other maps,
/// and while map A's PR commands are held; map A's own latency then.
struct MapHang {
    alone: Lat,
    base: Lat,
    during: Lat,
    a_base: Lat,
    a_during: Lat,
}

/// Client B on map B throughout; first alone, then with a client on every
/// other map (A included), in alternating phases: nothing held, and A's
/// PR commands held `opts.hang` on each of its paths (its own paths are
/// offline, its fault paths carry its commands). Every phase starts once
/// A's client has had an answer under its rule, and 300 ms later.
fn map_phases(d: &Daemon, maps: &[Map], faults: &[FaultPath], opts: &Opts) -> MapHang {
    const PHASES: usize = 3;
    let phase = scaled_d(opts, Duration::from_secs(8));
    let settle = Duration::from_millis(300);
    let answer_limit = opts.hang * 2 + Duration::from_secs(10);
    let hold = |d: Duration| faults.iter().for_each(|f| f.hold(d));
    hold(Duration::ZERO);
    let b = Looper::start(d, &maps[1].dev);
    std::thread::sleep(settle);
    let t = Instant::now();
    std::thread::sleep(phase / 2);
    let alone = [(t, Instant::now())];
    let a = Looper::start(d, &maps[0].dev);
    let others: Vec<Looper> = maps[2..].iter().map(|m| Looper::start(d, &m.dev)).collect();
    let (mut base, mut hung) = (Vec::new(), Vec::new());
    for _ in 0..PHASES {
        hold(Duration::ZERO);
        a.wait_answers(1, answer_limit);
        std::thread::sleep(settle);
        let t = Instant::now();
        std::thread::sleep(phase);
        base.push((t, Instant::now()));
        hold(opts.hang);
        // the command in flight when the hold began may pass; the next waits
        a.wait_answers(1, answer_limit);
        std::thread::sleep(settle);
        let t = Instant::now();
        std::thread::sleep(phase);
        hung.push((t, Instant::now()));
    }
    hold(Duration::ZERO);
    let bv = b.finish();
    let av = a.finish();
    others.into_iter().for_each(|o| drop(o.finish()));
    MapHang {
        alone: lat_or_zero(in_windows(&bv, &alone)),
        base: lat_or_zero(in_windows(&bv, &base)),
        during: lat_or_zero(in_windows(&bv, &hung)),
        a_base: lat_or_zero(in_windows(&av, &base)),
        // A's own requests within the hang phases: the hang itself
        a_during: lat_or_zero(in_windows(&av, &hung)),
    }
}

fn maps(opts: &Opts) {
    let maps = bed_maps();
    assert!(
        maps.len() >= 2,
        "prbench maps needs RESERVD_VM_MAPS=2 or more"
    );
    let n = maps.len();
    let place = format!("VM, {n} maps");
    let hang_ms = opts.hang.as_millis();

    // Map A's PR commands go through two fault paths: its own two paths are
    // removed (multipathd takes them out of the map), so that A is again a
    // map of two paths, both behind the fault injector.
    let faults: Vec<FaultPath> = ["mapa1", "mapa2"]
        .iter()
        .map(|name| FaultPath::add(&maps[0].dev, name))
        .collect();
    for f in &faults {
        wait_path_state(&f.dev, "active ready");
    }
    let slaves = |m: &str| -> Vec<String> {
        let dm = std::fs::canonicalize(m).unwrap();
        let name = dm.file_name().unwrap().to_string_lossy().to_string();
        let mut v: Vec<String> = std::fs::read_dir(format!("/sys/block/{name}/slaves"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    for p in &maps[0].paths {
        std::fs::write(
            format!("/sys/block/{}/device/delete", p.trim_start_matches("/dev/")),
            "1\n",
        )
        .unwrap();
    }
    let mut want: Vec<String> = faults
        .iter()
        .map(|f| f.dev.trim_start_matches("/dev/").to_string())
        .collect();
    want.sort();
    let t = Instant::now();
    while slaves(&maps[0].dev) != want {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{}: paths {:?}, expected {want:?}",
            maps[0].dev,
            slaves(&maps[0].dev)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "{}: its paths are the fault paths {} and {} alone",
        maps[0].dev, faults[0].dev, faults[1].dev
    );

    let a_dev = open_dev(&maps[0].dev);
    let (r, q) = start_both(opts, &a_dev, 0, &maps[0].dev);
    // The injector works through both daemons: a held READ KEYS on map A
    // answers GOOD after the hold.
    for d in [&r, &q] {
        faults.iter().for_each(|f| f.hold(opts.hang));
        let t = Instant::now();
        let a = d.client().execute(&READ_KEYS, a_dev.as_fd(), &[]).unwrap();
        let took = t.elapsed();
        faults.iter().for_each(|f| f.hold(Duration::ZERO));
        assert_eq!(a.status.0, 0, "held READ KEYS on map A: {a:?}");
        assert!(
            took >= opts.hang.mul_f64(0.9),
            "READ KEYS on map A held {hang_ms} ms answered after {took:?}"
        );
        eprintln!("held READ KEYS on map A answered after {took:?}");
    }

    let h: Vec<MapHang> = [&r, &q]
        .iter()
        .map(|d| map_phases(d, &maps, &faults, opts))
        .collect();
    let others = if n > 2 {
        format!(", A and the {} other maps busy", n - 2)
    } else {
        ", map A busy".to_string()
    };
    let lat_rows = |label: &str, f: &dyn Fn(&MapHang) -> &Lat| {
        let (rl, ql) = (f(&h[0]), f(&h[1]));
        for (p, rv, qv) in [("p50", rl.p50, ql.p50), ("p99", rl.p99, ql.p99)] {
            row_d(
                &place,
                &format!("{label} {p} (n={}/{})", rl.n, ql.n),
                rv,
                qv,
            );
        }
    };
    lat_rows("map B READ KEYS, B alone,", &|m| &m.alone);
    lat_rows(&format!("map B READ KEYS{others}, nothing held,"), &|m| {
        &m.base
    });
    lat_rows(
        &format!("map B READ KEYS{others}, map A's PR commands held {hang_ms} ms,"),
        &|m| &m.during,
    );
    let div = |a: &Lat, b: &Lat| ratio(a.p99.as_secs_f64(), b.p99.as_secs_f64());
    row(
        &place,
        "map B p99 while A's commands hang ÷ nothing held (target ≤ 1.1)",
        &div(&h[0].during, &h[0].base),
        &div(&h[1].during, &h[1].base),
        "—",
    );
    row(
        &place,
        "map B p99 while A's commands hang ÷ B alone",
        &div(&h[0].during, &h[0].alone),
        &div(&h[1].during, &h[1].alone),
        "—",
    );
    lat_rows(
        "map A READ KEYS (through the fault paths), nothing held,",
        &|m| &m.a_base,
    );
    lat_rows(
        &format!("map A READ KEYS (the hang itself), held {hang_ms} ms,"),
        &|m| &m.a_during,
    );

    // Throughput through the maps without fault paths (B, C, ...), the
    // clients spread over them in turn.
    for clients in [1, 16, 64] {
        let dur = scaled_d(opts, Duration::from_secs(3));
        let next = std::cell::Cell::new(0);
        let open = || {
            let i = next.get();
            next.set(i + 1);
            open_dev(&maps[1 + i % (n - 1)].dev)
        };
        let rt = throughput(&r, &open, clients, dur);
        next.set(0);
        let qt = throughput(&q, &open, clients, dur);
        row(
            &place,
            &format!(
                "READ KEYS throughput through {} map(s), {clients} client(s)",
                n - 1
            ),
            &format!("{rt:.0} req/s"),
            &format!("{qt:.0} req/s"),
            &ratio(rt, qt),
        );
    }
}
