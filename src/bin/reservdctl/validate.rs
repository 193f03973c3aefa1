//! `reservdctl validate`: the host's side of [`reservd_client::validate`].
//!
//! PR OUT commands go through reservd (`-k`), on the map opened read-write,
//! as QEMU sends a guest's. Everything else is read as `reservdctl status`
//! reads it ([`crate::status::gather`]: PR IN on each path with SG_IO,
//! sysfs, multipathd). A path is taken offline and brought back through
//! sysfs (`/sys/block/NAME/device/state`). The cleanup's last resorts act
//! directly: PR OUT REGISTER with a zero service action key on a path
//! (SG_IO), `unsetprkey` to multipathd. SIGINT, SIGTERM and SIGHUP are
//! blocked and read from a signal fd between steps, so that a stop still
//! runs the cleanup.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use reservd_client::client::Client;
use reservd_client::pathcheck::{self, MapStatus};
use reservd_client::validate::{self, Look, Lu, PathState, PathView, Target};
use reservd_daemon::backend::multipath::multipathd::Multipathd;
use reservd_daemon::backend::multipath::{basic_params, prout_cdb};
use reservd_daemon::backend::sgio::SgIo;
use reservd_daemon::backend::{Command, PrBackend};
use reservd_daemon::observe::audit::read_sysfs;
use reservd_proto::cdb::{pad16, prout_sa};
use reservd_proto::params::ProutParams;
use reservd_proto::prin;
use reservd_proto::sense::{Answer, Status};

/// What the command line asked for.
pub struct Asked<'a> {
    pub device: &'a Path,
    pub with_failover: bool,
    pub failover_path: Option<String>,
    pub expected: Vec<u64>,
    pub force: bool,
    pub key: Option<u64>,
    pub path_timeout: Duration,
}

/// The host's map.
struct HostLu {
    /// `/dev/mapper/NAME`.
    map_dev: PathBuf,
    map: String,
    /// The map, opened read-write, passed with every command.
    fd: File,
    socket: PathBuf,
    client: Option<Client>,
    multipathd: Multipathd,
    signals: SignalFd,
    stopped: bool,
}

impl HostLu {
    fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.is_none() {
            let stream = UnixStream::connect(&self.socket)
                .map_err(|e| format!("connecting to {}: {e}", self.socket.display()))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(120)))
                .map_err(|e| e.to_string())?;
            let c = Client::negotiate(stream, 0)
                .map_err(|e| format!("handshake with {}: {e}", self.socket.display()))?;
            self.client = Some(c);
        }
        Ok(self.client.as_mut().expect("connected"))
    }

    fn mpd_paths(&self) -> Result<Vec<(String, String)>, String> {
        let mut c = self
            .multipathd
            .connect()
            .map_err(|e| format!("{}: {e}", self.multipathd.describe()))?;
        c.command("show paths raw format \"%d %t %T %o\"")
            .map(|r| pathcheck::parse_show_paths(&r))
            .map_err(|e| e.to_string())
    }
}

fn state_file(name: &str) -> PathBuf {
    PathBuf::from(format!("/sys/block/{name}/device/state"))
}

/// What `reservdctl status` gathered, as validate reads it.
pub fn look_of(s: &MapStatus) -> Look {
    let paths = s
        .paths
        .iter()
        .map(|p| {
            let read = p.read.as_ref().map_err(Clone::clone);
            PathView {
                name: p.name.clone(),
                usable: p.usable(),
                keys: read.clone().and_then(|r| {
                    prin::parse_read_keys(&r.read_keys)
                        .map(|(_, k, _)| k)
                        .map_err(|_| "READ KEYS data truncated".to_string())
                }),
                own_keys: p.own_keys(),
                reservation: read.and_then(|r| {
                    prin::parse_read_reservation(&r.read_reservation)
                        .map(|(_, r)| r)
                        .map_err(|_| "READ RESERVATION data truncated".to_string())
                }),
            }
        })
        .collect();
    let map_key = match (&s.multipathd, &s.multipathd_key) {
        (_, Some(k)) => k.clone(),
        (Err(e), None) => Err(e.clone()),
        (Ok(()), None) => Err("not asked".into()),
    };
    Look { paths, map_key }
}

impl Lu for HostLu {
    fn prout(&mut self, sa: u8, t: u8, key: u64, sa_key: u64) -> Result<Answer, String> {
        let params = ProutParams {
            key,
            sa_key,
            ..Default::default()
        }
        .encode();
        let cdb = prout_cdb(sa, 0, t);
        let fd = self.fd.try_clone().map_err(|e| e.to_string())?;
        let r = self
            .client()?
            .execute(&cdb, fd.as_fd(), &params)
            .map_err(|e| format!("reservd closed the connection ({e})"));
        if r.is_err() {
            // A new connection for the next command.
            self.client = None;
        }
        r
    }

    fn look(&mut self) -> Result<Look, String> {
        crate::status::gather(&self.map_dev)
            .map(|s| look_of(&s))
            .map_err(|e| format!("{e:#}"))
    }

    fn path_state(&mut self, name: &str) -> Result<PathState, String> {
        let multipathd = self
            .mpd_paths()?
            .into_iter()
            .find(|(d, _)| d == name)
            .map(|(_, s)| s);
        Ok(PathState {
            sysfs: read_sysfs(&state_file(name)),
            multipathd,
        })
    }

    fn set_running(&mut self, name: &str, running: bool) -> Result<(), String> {
        let f = state_file(name);
        std::fs::write(&f, if running { "running\n" } else { "offline\n" })
            .map_err(|e| format!("{}: {e}", f.display()))
    }

    fn unregister_on_path(&mut self, name: &str, key: u64) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let node = Path::new("/dev").join(name);
        // CAP_SYS_RAWIO lets SG_IO send PR OUT on a read-only fd.
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&node)
            .map_err(|e| format!("{}: {e}", node.display()))?;
        let cdb = pad16(&prout_cdb(prout_sa::REGISTER, 0, 0));
        let params = basic_params(key, 0);
        let sg = SgIo { timeout_ms: 20_000 };
        for _ in 0..4 {
            let a = sg
                .execute(&Command {
                    nexus: 0,
                    peer: None,
                    fd: f.as_fd(),
                    cdb: &cdb,
                    params: &params,
                })
                .map_err(|e| e.to_string())?;
            if a.status == Status::GOOD {
                return Ok(());
            }
            if a.sense_code().is_none_or(|c| c.key != 6) {
                return Err(reservd_client::report::answer_text(&a));
            }
        }
        Err("unit attentions kept coming".into())
    }

    fn forget_map_key(&mut self) -> Result<(), String> {
        let mut c = self
            .multipathd
            .connect()
            .map_err(|e| format!("{}: {e}", self.multipathd.describe()))?;
        let r = c
            .command(&format!("unsetprkey map {}", self.map))
            .map_err(|e| e.to_string())?;
        if r.trim() != "ok" {
            return Err(format!("unsetprkey: {}", r.trim()));
        }
        // multipath-tools 0.13 and later also keep whether the map is
        // registered; older ones do not know the command.
        let _ = c.command(&format!("unsetprstatus map {}", self.map));
        Ok(())
    }

    fn interrupted(&mut self) -> bool {
        while let Ok(Some(s)) = self.signals.read_signal() {
            eprintln!(
                "reservdctl: signal {} received: stopping after the cleanup",
                s.ssi_signo
            );
            self.stopped = true;
        }
        self.stopped
    }

    fn pause(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// A test key nobody uses: the prefix, and 32 random bits.
fn random_key() -> anyhow::Result<u64> {
    use std::io::Read;
    let mut b = [0u8; 4];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("/dev/urandom")?;
    Ok(validate::TEST_KEY_PREFIX | u64::from(u32::from_be_bytes(b)))
}

/// `reservdctl validate`: the exit status.
pub fn run(socket: &Path, asked: &Asked<'_>, json: bool) -> anyhow::Result<u8> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "validate needs root: it reads each path of the map with SG_IO and sets a path \
             offline through sysfs"
        );
    }
    // A stop between steps still cleans up.
    let mut mask = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        mask.add(s);
    }
    mask.thread_block().context("blocking signals")?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("signalfd")?;
    let first = crate::status::gather(asked.device)?;
    let Some(map) = first.map.clone() else {
        bail!(
            "{} is not a multipath map: validate checks a map's paths",
            asked.device.display()
        );
    };
    let map_dev = PathBuf::from("/dev/mapper").join(&map);
    // Through reservd, as a guest's commands: it must be there.
    let client = UnixStream::connect(socket)
        .and_then(|s| {
            s.set_read_timeout(Some(Duration::from_secs(120)))?;
            Client::negotiate(s, 0)
        })
        .with_context(|| {
            format!(
                "validate sends its commands through reservd, as a guest's go: cannot reach \
                 {} (start reservd, or name its socket with -k)",
                socket.display()
            )
        })?;
    let fd = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&map_dev)
        .with_context(|| format!("opening {}", map_dev.display()))?;
    let key = match asked.key {
        Some(k) => k,
        None => random_key()?,
    };
    let paths: Vec<&str> = first.paths.iter().map(|p| p.name.as_str()).collect();
    let header = format!(
        "Validating {} (map {map}, WWID {}, paths {}) through reservd at {}, test key 0x{key:x}:",
        asked.device.display(),
        first.wwid.as_deref().unwrap_or("unknown"),
        paths.join(", "),
        socket.display()
    );
    let target = Target {
        device: asked.device.display().to_string(),
        map: map.clone(),
        wwid: first.wwid.clone(),
        socket: socket.display().to_string(),
    };
    let mut lu = HostLu {
        map_dev,
        map,
        fd,
        socket: socket.to_path_buf(),
        client: Some(client),
        multipathd: Multipathd::from_env().with_timeout(Duration::from_secs(5)),
        signals,
        stopped: false,
    };
    let opts = validate::Options {
        key,
        expected: asked.expected.clone(),
        force: asked.force,
        with_failover: asked.with_failover,
        failover_path: asked.failover_path.clone(),
        path_timeout: asked.path_timeout,
    };
    if json {
        let report = validate::run(&mut lu, &opts);
        println!("{}", validate::json(&target, asked.with_failover, &report));
        return Ok(report.exit_code());
    }
    // Each check's line as it ends: with a path to fail, a run takes a
    // while.
    println!("{header}");
    let width = validate::name_width(asked.with_failover);
    let report = validate::run_with(&mut lu, &opts, &mut |c| {
        println!("{}", validate::line(c, width));
    });
    print!("{}", validate::verdict_line(&report));
    Ok(report.exit_code())
}
