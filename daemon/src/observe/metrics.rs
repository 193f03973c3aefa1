//! Metrics in Prometheus' text format (version 0.0.4): what reservd does,
//! for `reservdctl metrics` (the metrics socket, served by the event loop)
//! and node_exporter's textfile collector (`--metrics-file`). reservd opens
//! no network port. docs/metrics.md lists every metric.
//!
//! - [`Measured`] wraps the router: every command a backend runs is counted
//!   by command, service action, status and backend, and timed (a
//!   histogram per command, service action and backend). Its cost on a
//!   command's way: two clock reads and a handful of relaxed atomic
//!   additions, no lock. Commands running now are kept in slots (one
//!   atomic each), so that those running for more than [`HUNG_AFTER`]
//!   show as hung while they hang.
//! - The server counts connections and the loop's rescues
//!   ([`crate::server::stats`]), the multipath side libmpathpersist's
//!   return codes, the routes and each map's registration count
//!   ([`crate::backend::multipath::stats`]).
//! - [`render`] reads them all; [`FileWriter`] writes the text to a file
//!   every interval, replacing it atomically (a temporary file renamed
//!   over it), as the textfile collector wants.

use std::fmt::{Display, Write as _};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::backend::router::Router;
use crate::backend::{BackendError, BackendKind, Command, Nexus, PrBackend};
use crate::server::metrics_socket::Render;
use crate::server::stats::ServerStats;
use reservd_proto::cdb::{prin_sa, prout_sa, PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT};
use reservd_proto::sense::{Answer, Status};
use reservd_proto::wire::OP_CLEANUP;

/// A command running longer than this is counted as hung
/// (`reservd_commands_hung` while it runs, `reservd_command_hangs_total`
/// once it ends). A healthy device answers a PR command in milliseconds;
/// libmpathpersist on a map with a failing path may take seconds.
pub const HUNG_AFTER: Duration = Duration::from_secs(10);

/// The histogram's upper bounds, in nanoseconds, and as Prometheus' `le`.
const BUCKETS: [(u64, &str); 18] = [
    (100_000, "0.0001"),
    (250_000, "0.00025"),
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
    (10_000_000_000, "10"),
    (30_000_000_000, "30"),
    (60_000_000_000, "60"),
];

/// The `command` and `service_action` labels of each kind of command.
const KINDS: [(&str, &str); 17] = [
    ("PR_IN", "READ_KEYS"),
    ("PR_IN", "READ_RESERVATION"),
    ("PR_IN", "REPORT_CAPABILITIES"),
    ("PR_IN", "READ_FULL_STATUS"),
    ("PR_IN", "UNKNOWN"),
    ("PR_OUT", "REGISTER"),
    ("PR_OUT", "RESERVE"),
    ("PR_OUT", "RELEASE"),
    ("PR_OUT", "CLEAR"),
    ("PR_OUT", "PREEMPT"),
    ("PR_OUT", "PREEMPT_AND_ABORT"),
    ("PR_OUT", "REGISTER_AND_IGNORE"),
    ("PR_OUT", "REGISTER_AND_MOVE"),
    ("PR_OUT", "REPLACE_LOST_RESERVATION"),
    ("PR_OUT", "UNKNOWN"),
    ("CLEANUP", "CLEANUP"),
    ("OTHER", "OTHER"),
];

/// The kind of the command `cdb` starts: an index into [`KINDS`].
fn kind(cdb: &[u8; 16]) -> usize {
    let sa = cdb[1] & 0x1f;
    match cdb[0] {
        PERSISTENT_RESERVE_IN if sa <= prin_sa::READ_FULL_STATUS => sa as usize,
        PERSISTENT_RESERVE_IN => 4,
        PERSISTENT_RESERVE_OUT if sa <= prout_sa::REPLACE_LOST_RESERVATION => 5 + sa as usize,
        PERSISTENT_RESERVE_OUT => 14,
        OP_CLEANUP => 15,
        _ => 16,
    }
}

/// The `status` label: the answer's status (as the audit trail names it),
/// or `CONNECTION_CLOSED` when the backend had no answer.
const STATUSES: [&str; 7] = [
    "GOOD",
    "CHECK_CONDITION",
    "BUSY",
    "RESERVATION_CONFLICT",
    "TASK_SET_FULL",
    "OTHER",
    "CONNECTION_CLOSED",
];

fn status_index(r: &Result<Answer, BackendError>) -> usize {
    match r {
        Ok(a) => match a.status {
            Status::GOOD => 0,
            Status::CHECK_CONDITION => 1,
            Status::BUSY => 2,
            Status::RESERVATION_CONFLICT => 3,
            Status::TASK_SET_FULL => 4,
            _ => 5,
        },
        Err(_) => 6,
    }
}

const BACKENDS: [BackendKind; 2] = [BackendKind::SgIo, BackendKind::Multipath];

/// Slots for the commands running at once: as many as the server runs at
/// most by default. A command that finds none free is counted, not
/// watched for hanging.
const SLOTS: usize = 256;

/// One histogram: the count per bucket (the last one +Inf), the sum.
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, ns: u64) {
        let i = BUCKETS.partition_point(|&(le, _)| le < ns);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }
}

/// The counters of the commands the backends ran.
pub struct CommandMetrics {
    /// By kind, status and backend.
    counts: Box<[[[AtomicU64; 2]; STATUSES.len()]; KINDS.len()]>,
    /// By kind and backend.
    durations: Box<[[Histogram; 2]; KINDS.len()]>,
    /// When each running command started: nanoseconds since `epoch`, plus
    /// one; 0 is a free slot.
    running: Box<[AtomicU64; SLOTS]>,
    epoch: Instant,
    /// Commands that ended after running longer than [`HUNG_AFTER`].
    hangs: AtomicU64,
}

impl Default for CommandMetrics {
    fn default() -> Self {
        CommandMetrics {
            counts: Box::new(std::array::from_fn(|_| {
                std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0)))
            })),
            durations: Box::new(std::array::from_fn(|_| {
                std::array::from_fn(|_| Histogram::default())
            })),
            running: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
            epoch: Instant::now(),
            hangs: AtomicU64::new(0),
        }
    }
}

/// A command being run: frees its slot when dropped (also when the
/// command panics).
struct Running<'a> {
    metrics: &'a CommandMetrics,
    slot: Option<usize>,
    started: Instant,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            self.metrics.running[s].store(0, Relaxed);
        }
    }
}

impl CommandMetrics {
    /// A command from connection `nexus` starts now. The search for a
    /// free slot starts at the connection's own, so that commands running
    /// together rarely contend.
    fn start(&self, nexus: Nexus) -> Running<'_> {
        self.start_at(nexus, Instant::now())
    }

    fn start_at(&self, nexus: Nexus, started: Instant) -> Running<'_> {
        let stamp = started.saturating_duration_since(self.epoch).as_nanos() as u64 + 1;
        let first = (nexus as usize) % SLOTS;
        let slot = (0..SLOTS).map(|i| (first + i) % SLOTS).find(|&s| {
            self.running[s]
                .compare_exchange(0, stamp, Relaxed, Relaxed)
                .is_ok()
        });
        Running {
            metrics: self,
            slot,
            started,
        }
    }

    /// The command `run` stands for ended with `r`, run by `backend`.
    fn end(
        &self,
        run: Running<'_>,
        cdb: &[u8; 16],
        r: &Result<Answer, BackendError>,
        backend: BackendKind,
    ) {
        let took = run.started.elapsed();
        drop(run);
        let k = kind(cdb);
        let b = backend as usize;
        self.counts[k][status_index(r)][b].fetch_add(1, Relaxed);
        self.durations[k][b].observe(took.as_nanos().min(u64::MAX as u128) as u64);
        if took >= HUNG_AFTER {
            self.hangs.fetch_add(1, Relaxed);
        }
    }

    /// Commands running now, and those of them running for longer than
    /// [`HUNG_AFTER`].
    pub fn running(&self) -> (usize, usize) {
        self.running_at(Instant::now())
    }

    fn running_at(&self, now: Instant) -> (usize, usize) {
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1;
        let hung = HUNG_AFTER.as_nanos() as u64;
        let mut n = 0;
        let mut long = 0;
        for s in self.running.iter() {
            let t = s.load(Relaxed);
            if t != 0 {
                n += 1;
                if now.saturating_sub(t) >= hung {
                    long += 1;
                }
            }
        }
        (n, long)
    }
}

/// The backend reservd serves with, counted: the router, each command
/// timed and counted by what [`Router::execute_routed`] says ran it.
pub struct Measured {
    pub router: Arc<Router>,
    pub metrics: Arc<CommandMetrics>,
}

impl PrBackend for Measured {
    fn execute(&self, cmd: &Command<'_>) -> Result<Answer, BackendError> {
        let run = self.metrics.start(cmd.nexus);
        let (r, backend) = self.router.execute_routed(cmd);
        self.metrics.end(run, cmd.cdb, &r, backend);
        r
    }

    fn disconnect(&self, nexus: Nexus) {
        self.router.disconnect(nexus)
    }
}

/// Everything the metrics are read from.
pub struct Sources {
    pub commands: Arc<CommandMetrics>,
    pub server: Arc<ServerStats>,
    pub router: Arc<Router>,
    /// When reservd started.
    pub started: SystemTime,
}

fn seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A label value escaped as the text format wants (`\`, `"`, newline).
fn escape(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// The text being written.
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, ty: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {ty}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A family with one sample and no labels.
    fn single(&mut self, name: &str, ty: &str, help: &str, value: impl Display) {
        self.family(name, ty, help);
        self.sample(name, &[], value);
    }
}

/// The metrics, in Prometheus' text format.
pub fn render(s: &Sources) -> String {
    let mut t = Text(String::with_capacity(8192));
    t.family("reservd_info", "gauge", "reservd's version.");
    t.sample("reservd_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    t.single(
        "reservd_start_time_seconds",
        "gauge",
        "When reservd started, in seconds since the epoch.",
        seconds(s.started),
    );
    t.single(
        "reservd_multipath_active",
        "gauge",
        "1 when multipath maps go through libmpathpersist, 0 while it loads or without it.",
        u8::from(s.router.multipath_active()),
    );
    commands(&mut t, &s.commands);
    server(&mut t, &s.server);
    if let Some(m) = s.router.multipath() {
        multipath(&mut t, &m.stats);
    }
    t.0
}

fn commands(t: &mut Text, c: &CommandMetrics) {
    t.family(
        "reservd_commands_total",
        "counter",
        "PR commands a backend ran, by command, service action, status and backend.",
    );
    for (k, (command, sa)) in KINDS.iter().enumerate() {
        for (si, status) in STATUSES.iter().enumerate() {
            for (b, backend) in BACKENDS.iter().enumerate() {
                let n = c.counts[k][si][b].load(Relaxed);
                if n > 0 {
                    t.sample(
                        "reservd_commands_total",
                        &[
                            ("command", command),
                            ("service_action", sa),
                            ("status", status),
                            ("backend", backend.name()),
                        ],
                        n,
                    );
                }
            }
        }
    }
    t.family(
        "reservd_command_duration_seconds",
        "histogram",
        "How long the backend took for each command, by command, service action and backend.",
    );
    for (k, (command, sa)) in KINDS.iter().enumerate() {
        for (b, backend) in BACKENDS.iter().enumerate() {
            let h = &c.durations[k][b];
            let counts: Vec<u64> = h.buckets.iter().map(|n| n.load(Relaxed)).collect();
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            let labels = [
                ("command", *command),
                ("service_action", *sa),
                ("backend", backend.name()),
            ];
            let mut cumulative = 0;
            for (i, n) in counts.iter().enumerate() {
                cumulative += n;
                let le = BUCKETS.get(i).map_or("+Inf", |b| b.1);
                let mut l = labels.to_vec();
                l.push(("le", le));
                t.sample("reservd_command_duration_seconds_bucket", &l, cumulative);
            }
            t.sample(
                "reservd_command_duration_seconds_sum",
                &labels,
                h.sum_ns.load(Relaxed) as f64 / 1e9,
            );
            t.sample("reservd_command_duration_seconds_count", &labels, total);
        }
    }
    let (running, hung) = c.running();
    t.single(
        "reservd_commands_in_flight",
        "gauge",
        "Commands a backend is running now.",
        running,
    );
    t.single(
        "reservd_commands_hung",
        "gauge",
        "Commands running now for longer than 10 seconds.",
        hung,
    );
    t.single(
        "reservd_command_hangs_total",
        "counter",
        "Commands that ended after running for longer than 10 seconds.",
        c.hangs.load(Relaxed),
    );
}

fn server(t: &mut Text, s: &ServerStats) {
    let get = ServerStats::get;
    t.single(
        "reservd_loop_rescues_total",
        "counter",
        "Times another thread took the event loop over from a thread running a command \
         (a command that ran past 1 to 2 ms).",
        get(&s.rescues),
    );
    t.single(
        "reservd_connections_accepted_total",
        "counter",
        "Client connections accepted.",
        get(&s.accepted),
    );
    t.family(
        "reservd_connections_refused_total",
        "counter",
        "Client connections closed at accept, by reason.",
    );
    t.sample(
        "reservd_connections_refused_total",
        &[("reason", "not_allowed")],
        get(&s.refused_not_allowed),
    );
    t.sample(
        "reservd_connections_refused_total",
        &[("reason", "limit")],
        get(&s.refused_limit),
    );
    t.single(
        "reservd_connections_open",
        "gauge",
        "Client connections open now.",
        get(&s.open),
    );
    t.single(
        "reservd_connections_protocol_errors_total",
        "counter",
        "Client connections closed for a protocol violation (or a frame not finished in time).",
        get(&s.protocol_errors),
    );
    t.single(
        "reservd_connections_backend_failures_total",
        "counter",
        "Client connections closed because a command had no answer (multipathd unreachable \
         for CLEANUP, an unusable fd, a command that panicked).",
        get(&s.backend_failures),
    );
    t.single(
        "reservd_metrics_requests_total",
        "counter",
        "Clients served on the metrics socket.",
        get(&s.metrics_requests),
    );
}

fn multipath(t: &mut Text, m: &crate::backend::multipath::stats::MultipathStats) {
    t.family(
        "reservd_multipath_library_calls_total",
        "counter",
        "libmpathpersist calls, by call and return code (MPATH_PR_*).",
    );
    for (call, result, n) in m.library_counts() {
        t.sample(
            "reservd_multipath_library_calls_total",
            &[("call", call.name()), ("result", result)],
            n,
        );
    }
    t.family(
        "reservd_multipath_routes_total",
        "counter",
        "PR OUT commands on maps, by how reservd ran them (one nexus per map).",
    );
    for (route, n) in m.route_counts() {
        t.sample("reservd_multipath_routes_total", &[("route", route)], n);
    }
    let maps = m.maps();
    let families = [
        (
            "reservd_map_check_success",
            "1 when the last count after a PR OUT on the map succeeded, 0 when it could not \
             be taken.",
        ),
        (
            "reservd_map_check_timestamp_seconds",
            "When the map's registrations were last counted (after a PR OUT on it).",
        ),
        (
            "reservd_map_check_duration_seconds",
            "How long the last count took (the PR OUT it followed waited for it).",
        ),
        (
            "reservd_map_active_paths",
            "The map's active paths at the last count.",
        ),
        (
            "reservd_map_registered",
            "1 when multipath-tools held a key for the map at the last count.",
        ),
        (
            "reservd_map_key_registrations",
            "Registrations of the map's key that READ KEYS listed at the last count.",
        ),
        (
            "reservd_map_paths_lacking_key",
            "Active paths without the map's key at the last count (0 when it has no key).",
        ),
    ];
    for (name, help) in families {
        t.family(name, "gauge", help);
        for c in &maps {
            let labels = [
                ("map", c.name.as_str()),
                ("wwid", c.wwid.as_deref().unwrap_or("")),
            ];
            let value = match (name, &c.outcome) {
                ("reservd_map_check_success", o) => u8::from(o.is_ok()) as f64,
                ("reservd_map_check_timestamp_seconds", _) => seconds(c.at),
                ("reservd_map_check_duration_seconds", _) => c.took.as_secs_f64(),
                (_, Err(_)) => continue,
                ("reservd_map_active_paths", Ok(n)) => n.active_paths as f64,
                ("reservd_map_registered", Ok(n)) => u8::from(n.registered) as f64,
                ("reservd_map_key_registrations", Ok(n)) => n.key_registrations as f64,
                (_, Ok(n)) => n.paths_lacking_key() as f64,
            };
            t.sample(name, &labels, value);
        }
    }
}

/// Writes the metrics to a file every interval, for node_exporter's
/// textfile collector; removes it when stopped.
pub struct FileWriter {
    path: PathBuf,
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The temporary file beside `path` that is renamed over it (its name
/// does not end in `.prom`: the collector skips it).
fn temporary(path: &Path) -> PathBuf {
    let mut t = path.as_os_str().to_owned();
    t.push(".tmp");
    PathBuf::from(t)
}

/// Write `text` to `path` at once: a temporary file, mode 0644 (the
/// collector runs as another user), renamed over `path`.
pub fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = temporary(path);
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.write_all(text.as_bytes())?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

impl FileWriter {
    /// Write the metrics to `path` now (an error if that fails), then
    /// every `interval` on a thread of its own.
    pub fn start(path: PathBuf, interval: Duration, render: Render) -> anyhow::Result<FileWriter> {
        use anyhow::Context;
        write_file(&path, &render())
            .with_context(|| format!("cannot write the metrics file {}", path.display()))?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (p, s) = (path.clone(), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("reservd-metrics".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                let mut failing = false;
                loop {
                    let (g, _) = cv
                        .wait_timeout_while(stopped, interval, |stop| !*stop)
                        .unwrap_or_else(|e| e.into_inner());
                    stopped = g;
                    if *stopped {
                        return;
                    }
                    match write_file(&p, &render()) {
                        Ok(()) if failing => {
                            log::info!("metrics file {} written again", p.display());
                            failing = false;
                        }
                        Ok(()) => {}
                        Err(e) if !failing => {
                            log::warn!("cannot write the metrics file {}: {e}", p.display());
                            failing = true;
                        }
                        Err(_) => {}
                    }
                }
            })
            .context("starting the thread that writes the metrics file")?;
        Ok(FileWriter {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// Stop writing and remove the file: a reservd that is not running
    /// has no metrics.
    pub fn stop(mut self) {
        self.halt();
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!(
                "cannot remove the metrics file {}: {e}",
                self.path.display()
            );
        }
    }

    fn halt(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sgio::SgIo;
    use reservd_proto::cdb::{pad16, PrInCdb, PrOutCdb};
    use std::os::fd::AsFd;

    fn router() -> Arc<Router> {
        Arc::new(Router::ready(SgIo::default(), None, None))
    }

    fn sources(commands: Arc<CommandMetrics>, router: Arc<Router>) -> Sources {
        Sources {
            commands,
            server: Arc::default(),
            router,
            started: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    /// The sample lines (no comments) of `text` that start with `prefix`.
    fn lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
            .collect()
    }

    fn scratch_file(tag: &str) -> (PathBuf, std::fs::File) {
        let path = std::env::temp_dir().join(format!(
            "reservd-metrics-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (path, f)
    }

    #[test]
    fn commands_are_counted_by_kind_status_and_backend_and_timed() {
        let m = Arc::new(CommandMetrics::default());
        let backend = Measured {
            router: router(),
            metrics: Arc::clone(&m),
        };
        // A regular file stands for the disk: SG_IO fails (ENOTTY), which
        // is CHECK CONDITION from the SG_IO backend.
        let (path, f) = scratch_file("cmds");
        let read_keys = pad16(
            &PrInCdb {
                service_action: prin_sa::READ_KEYS,
                allocation_length: 8192,
            }
            .encode(),
        );
        let register = pad16(
            &PrOutCdb {
                service_action: prout_sa::REGISTER,
                scope: 0,
                pr_type: 0,
                parameter_list_length: 24,
            }
            .encode(),
        );
        let params = [0u8; 24];
        for (cdb, n) in [(&read_keys, 3), (&register, 1)] {
            for _ in 0..n {
                let cmd = Command {
                    nexus: 7,
                    peer: None,
                    fd: f.as_fd(),
                    cdb,
                    params: &params,
                };
                let a = backend.execute(&cmd).unwrap();
                assert_eq!(a.status, Status::CHECK_CONDITION);
            }
        }
        let _ = std::fs::remove_file(&path);
        let text = render(&sources(Arc::clone(&m), router()));
        assert_eq!(
            lines(&text, "reservd_commands_total"),
            [
                "reservd_commands_total{command=\"PR_IN\",service_action=\"READ_KEYS\",\
                 status=\"CHECK_CONDITION\",backend=\"sgio\"} 3",
                "reservd_commands_total{command=\"PR_OUT\",service_action=\"REGISTER\",\
                 status=\"CHECK_CONDITION\",backend=\"sgio\"} 1",
            ]
        );
        let buckets = lines(
            &text,
            "reservd_command_duration_seconds_bucket{command=\"PR_IN\"",
        );
        assert_eq!(buckets.len(), BUCKETS.len() + 1);
        assert!(buckets.last().unwrap().ends_with("le=\"+Inf\"} 3"));
        assert!(text.contains(
            "reservd_command_duration_seconds_count{command=\"PR_IN\",\
             service_action=\"READ_KEYS\",backend=\"sgio\"} 3\n"
        ));
        // Nothing is running any more, nothing hung.
        assert_eq!(m.running(), (0, 0));
        assert!(text.contains("\nreservd_commands_in_flight 0\n"));
        assert!(text.contains("\nreservd_command_hangs_total 0\n"));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::default();
        h.observe(100_000); // exactly 0.1 ms: in le="0.0001"
        h.observe(100_001);
        h.observe(61_000_000_000); // past the last bound: +Inf only
        let counts: Vec<u64> = h.buckets.iter().map(|n| n.load(Relaxed)).collect();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[1], 1);
        assert_eq!(counts[BUCKETS.len()], 1);
        assert_eq!(h.sum_ns.load(Relaxed), 61_000_200_001);
        let m = CommandMetrics::default();
        m.durations[0][0].observe(100_000);
        m.durations[0][0].observe(3_000_000);
        let mut t = Text(String::new());
        commands(&mut t, &m);
        let b = lines(&t.0, "reservd_command_duration_seconds_bucket");
        assert!(b[0].ends_with("le=\"0.0001\"} 1"), "{}", b[0]);
        assert!(b[4].ends_with("le=\"0.0025\"} 1"), "{}", b[4]);
        assert!(b[5].ends_with("le=\"0.005\"} 2"), "{}", b[5]);
        assert!(b[BUCKETS.len()].ends_with("le=\"+Inf\"} 2"));
        assert!(t.0.contains(
            "_sum{command=\"PR_IN\",service_action=\"READ_KEYS\",backend=\"sgio\"} 0.0031\n"
        ));
    }

    #[test]
    fn commands_running_long_show_as_hung_and_free_their_slot() {
        let now = Instant::now();
        let (Some(long), Some(epoch)) = (
            now.checked_sub(HUNG_AFTER + Duration::from_secs(1)),
            now.checked_sub(HUNG_AFTER + Duration::from_secs(2)),
        ) else {
            panic!("the monotonic clock starts at boot: more than 12 s ago");
        };
        let m = CommandMetrics {
            epoch,
            ..CommandMetrics::default()
        };
        let a = m.start_at(3, now);
        let b = m.start_at(3, long);
        assert_eq!(m.running_at(now), (2, 1));
        // Both from connection 3: the second took the next slot.
        assert_eq!((a.slot, b.slot), (Some(3), Some(4)));
        drop(a);
        assert_eq!(m.running_at(now), (1, 1));
        let cdb = [0x5eu8; 16];
        m.end(
            b,
            &cdb,
            &Ok(Answer::status(Status::GOOD)),
            BackendKind::SgIo,
        );
        assert_eq!(m.running_at(now), (0, 0));
        assert_eq!(m.hangs.load(Relaxed), 1);
        // All slots taken: the command is counted, not watched.
        let held: Vec<Running<'_>> = (0..SLOTS).map(|i| m.start_at(i as u64, now)).collect();
        let extra = m.start_at(0, now);
        assert_eq!(extra.slot, None);
        assert_eq!(m.running_at(now).0, SLOTS);
        drop(held);
        m.end(
            extra,
            &cdb,
            &Err(BackendError::Panicked("x".into())),
            BackendKind::SgIo,
        );
        assert_eq!(m.running_at(now), (0, 0));
        assert_eq!(m.counts[4][6][0].load(Relaxed), 1, "PR_IN UNKNOWN closed");
    }

    #[test]
    fn kinds_and_statuses() {
        let cdb = |op: u8, sa: u8| {
            let mut c = [0u8; 16];
            c[0] = op;
            c[1] = sa;
            c
        };
        assert_eq!(KINDS[kind(&cdb(0x5e, 3))], ("PR_IN", "READ_FULL_STATUS"));
        assert_eq!(KINDS[kind(&cdb(0x5e, 9))], ("PR_IN", "UNKNOWN"));
        assert_eq!(
            KINDS[kind(&cdb(0x5f, 6))],
            ("PR_OUT", "REGISTER_AND_IGNORE")
        );
        assert_eq!(
            KINDS[kind(&cdb(0x5f, 0xe6))],
            ("PR_OUT", "REGISTER_AND_IGNORE")
        );
        assert_eq!(KINDS[kind(&cdb(0x5f, 0x1f))], ("PR_OUT", "UNKNOWN"));
        assert_eq!(KINDS[kind(&cdb(0xff, 0))], ("CLEANUP", "CLEANUP"));
        for sa in 0..=8 {
            assert_eq!(KINDS[kind(&cdb(0x5f, sa))].1, prout_sa::name(sa));
        }
        for sa in 0..=3 {
            assert_eq!(KINDS[kind(&cdb(0x5e, sa))].1, prin_sa::name(sa));
        }
        let st = |s| STATUSES[status_index(&Ok(Answer::status(Status(s))))];
        assert_eq!(st(0x18), "RESERVATION_CONFLICT");
        assert_eq!(st(0x28), "TASK_SET_FULL");
        assert_eq!(st(0x40), "OTHER");
        for s in [0x00, 0x02, 0x08, 0x18, 0x28] {
            assert_eq!(st(s), Status(s).name().replace(' ', "_"));
        }
    }

    #[test]
    fn render_format_and_server_counters() {
        let s = sources(Arc::default(), router());
        ServerStats::bump(&s.server.accepted);
        ServerStats::bump(&s.server.accepted);
        ServerStats::bump(&s.server.refused_limit);
        ServerStats::bump(&s.server.rescues);
        let text = render(&s);
        assert!(text.starts_with(
            "# HELP reservd_info reservd's version.\n# TYPE reservd_info gauge\n\
             reservd_info{version=\""
        ));
        for want in [
            "reservd_start_time_seconds 1700000000\n",
            "reservd_multipath_active 0\n",
            "reservd_loop_rescues_total 1\n",
            "reservd_connections_accepted_total 2\n",
            "reservd_connections_refused_total{reason=\"not_allowed\"} 0\n",
            "reservd_connections_refused_total{reason=\"limit\"} 1\n",
            "# TYPE reservd_connections_open gauge\nreservd_connections_open 0\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        // No commands yet: the families are there, without samples; no
        // multipath side, no multipath families.
        assert!(text.contains("# TYPE reservd_commands_total counter\n# HELP"));
        assert!(!text.contains("reservd_multipath_library"));
        // Every sample line is NAME[{LABELS}] VALUE, each family's TYPE
        // comes before its samples, and no family is declared twice.
        let mut declared = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(declared.insert(name.to_string()), "{name} twice");
                continue;
            }
            if l.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = l.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| declared.contains(*f))
                .unwrap_or(name);
            assert!(declared.contains(family), "{l}: undeclared");
        }
    }

    #[test]
    fn each_maps_last_count_is_a_set_of_gauges() {
        use crate::backend::multipath::stats::{MapCheck, MapCount, MultipathStats};
        let m = MultipathStats::default();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        m.record(
            3,
            MapCheck {
                name: "mpathb".into(),
                wwid: None,
                at,
                took: Duration::from_millis(2),
                outcome: Err("multipathd: connection refused".into()),
            },
        );
        m.record(
            0,
            MapCheck {
                name: "mpatha".into(),
                wwid: Some("3600a0b8".into()),
                at,
                took: Duration::from_micros(1500),
                outcome: Ok(MapCount {
                    active_paths: 4,
                    registered: true,
                    key_registrations: 3,
                }),
            },
        );
        let mut t = Text(String::new());
        multipath(&mut t, &m);
        let a = "{map=\"mpatha\",wwid=\"3600a0b8\"}";
        let b = "{map=\"mpathb\",wwid=\"\"}";
        // By minor number: mpatha (dm-0) first.
        assert_eq!(
            lines(&t.0, "reservd_map_"),
            [
                format!("reservd_map_check_success{a} 1"),
                format!("reservd_map_check_success{b} 0"),
                format!("reservd_map_check_timestamp_seconds{a} 1700000100"),
                format!("reservd_map_check_timestamp_seconds{b} 1700000100"),
                format!("reservd_map_check_duration_seconds{a} 0.0015"),
                format!("reservd_map_check_duration_seconds{b} 0.002"),
                // A count that could not be taken has no counts.
                format!("reservd_map_active_paths{a} 4"),
                format!("reservd_map_registered{a} 1"),
                format!("reservd_map_key_registrations{a} 3"),
                format!("reservd_map_paths_lacking_key{a} 1"),
            ]
        );
        // Every family is declared, with no map too.
        let mut t = Text(String::new());
        multipath(&mut t, &MultipathStats::default());
        assert!(t.0.contains("# TYPE reservd_map_paths_lacking_key gauge\n"));
        assert!(lines(&t.0, "reservd_map_").is_empty());
        // Every route is listed, taken or not.
        assert_eq!(lines(&t.0, "reservd_multipath_routes_total").len(), 8);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut t = Text(String::new());
        t.sample("x", &[("map", "m\"1")], 2.5);
        assert_eq!(t.0, "x{map=\"m\\\"1\"} 2.5\n");
    }

    #[test]
    fn the_file_is_replaced_at_once_and_removed_when_stopped() {
        let dir = std::env::temp_dir().join(format!("reservd-metrics-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("reservd.prom");
        let n = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&n);
        let render: Render = Arc::new(move || format!("x {}\n", c.fetch_add(1, Relaxed)));
        let w = FileWriter::start(path.clone(), Duration::from_millis(20), render).unwrap();
        // Written at once, then again and again.
        let first = std::fs::read_to_string(&path).unwrap();
        assert!(first.starts_with("x "), "{first}");
        let t = Instant::now();
        while n.load(Relaxed) < 4 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(n.load(Relaxed) >= 4, "not rewritten");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        w.stop();
        // Gone, and no temporary file left.
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        // A directory that does not exist: the start fails.
        let e = FileWriter::start(
            dir.join("missing/reservd.prom"),
            Duration::from_secs(1),
            Arc::new(String::new),
        )
        .err()
        .expect("an error");
        assert!(
            format!("{e:#}").contains("cannot write the metrics file"),
            "{e:#}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
