//! Start-up: the command line, the listening socket (bound, or from
//! systemd socket activation), daemonizing and the pid file, privileges and
//! the seccomp filter, the backends and the server, in qemu-pr-helper's
//! order ([`run`]).

pub mod cli;
pub mod daemonize;
pub mod listen;
pub mod pidfile;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::backend;
use crate::observe::{audit, journal, logging, metrics, notify, trace};
use crate::sandbox::{access, privs, seccomp};
use crate::server;
use cli::Cli;
use reservd_proto::wire;

/// Run the daemon as the command line says. Returns when it has shut down.
///
/// The start-up order is qemu-pr-helper's: logging, the listening socket,
/// daemonizing, the pid file, dropping privileges, then serving. Two
/// additions: a pid file locked by a running instance stops start-up before
/// the socket is touched, and a socket reservd created is removed again
/// when a later start-up step fails.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let warnings = logging::init(cli.verbose, cli.quiet, &cli.trace).map_err(anyhow::Error::msg)?;
    for w in warnings {
        log::warn!("{w}");
    }
    // Resolve names before anything else can fail half-way.
    let user = cli
        .user
        .as_deref()
        .map(privs::lookup_user)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let group = cli
        .group
        .as_deref()
        .map(privs::lookup_group)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let ids = Ids {
        uid: user.map(|(u, _)| u),
        gid: group.or(user.and_then(|(_, g)| g)),
    };
    let seccomp_mode: seccomp::Mode = cli.seccomp.parse().map_err(anyhow::Error::msg)?;
    let allow = allow_list(&cli.allow_uid, &cli.allow_gid).map_err(anyhow::Error::msg)?;
    let perms = listen::SocketPerms {
        mode: cli.socket_mode,
        group: cli
            .socket_group
            .as_deref()
            .map(privs::lookup_group)
            .transpose()
            .map_err(anyhow::Error::msg)?,
    };
    let pidfile_path = match (&cli.pidfile, cli.daemon) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(PathBuf::from(pidfile::DEFAULT_PIDFILE)),
        (None, false) => None,
    };
    if let Some(p) = &pidfile_path {
        pidfile::check_pidfile_free(p)?;
    }

    // Stop signals go to the event loop's signal fd, in every thread.
    server::block_stop_signals().context("blocking signals")?;

    let listener = listen::listen(
        cli.socket.as_deref(),
        Path::new(listen::DEFAULT_SOCKET),
        perms,
        listen::DEFAULT_SOCKET_MODE,
    )?;
    let metrics_listener = match cli
        .metrics_socket
        .as_deref()
        .map(metrics_socket)
        .transpose()
    {
        Ok(l) => l,
        Err(e) => {
            listener.remove();
            return Err(e);
        }
    };
    let mut detached = None;
    let started = start(
        &cli,
        &listener,
        metrics_listener.as_ref(),
        pidfile_path.as_deref(),
        ids,
        Access {
            seccomp: seccomp_mode,
            allow,
        },
        &mut detached,
    );
    let Started {
        server,
        pidfile,
        status,
        metrics_file,
    } = match started {
        Ok(s) => s,
        Err(e) => {
            listener.remove();
            if let Some(m) = &metrics_listener {
                m.remove();
            }
            if let Some(d) = detached {
                d.failed(&format!("{e:#}"));
            }
            return Err(e);
        }
    };
    notify::notify_ready(&status);
    if let Some(d) = detached {
        d.ready();
    }
    let r = server.run();
    if let Some(w) = metrics_file {
        w.stop();
    }
    listener.remove();
    if let Some(m) = &metrics_listener {
        m.remove();
    }
    drop(pidfile);
    r.context("event loop")
}

/// The metrics socket: root's only (0600), like the main socket by default.
fn metrics_socket(path: &Path) -> anyhow::Result<listen::Listener> {
    listen::bind(path, 0o600, None).context("the metrics socket")
}

/// What start-up hands to the serving phase.
struct Started {
    server: server::Server,
    pidfile: Option<pidfile::PidFile>,
    /// The status line for systemd.
    status: String,
    metrics_file: Option<metrics::FileWriter>,
}

/// Multipath support, as decided while privileged.
enum Mpath {
    /// Off, and why.
    Off(String),
    /// Loaded already (reservd runs as another user).
    Now(Arc<backend::dm::DmControl>, backend::multipath::Loaded),
    /// To load in the background once serving.
    Later(Arc<backend::dm::DmControl>),
}

/// libmultipath's initialisation raises the open-file limit to its
/// `max_fds` (by default `max`: fs.nr_open). Loaded in the background, it
/// could not (capabilities dropped, setrlimit refused by the seccomp
/// filter) and would say so on stderr: raise the limit to fs.nr_open now,
/// as it would have.
fn raise_fd_limit_for_libmultipath() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Some(nr_open) = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
    else {
        return;
    };
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < nr_open {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, nr_open, hard.max(nr_open)) {
            log::debug!("cannot raise the open-file limit to {nr_open}: {e}");
        }
    }
}

/// The user and group to switch to.
#[derive(Clone, Copy)]
struct Ids {
    uid: Option<nix::unistd::Uid>,
    gid: Option<nix::unistd::Gid>,
}

/// The seccomp mode and the clients allowed.
struct Access {
    seccomp: seccomp::Mode,
    allow: Option<access::AllowList>,
}

/// `--allow-uid` and `--allow-gid`, names resolved to numbers.
fn allow_list(uids: &[String], gids: &[String]) -> Result<Option<access::AllowList>, String> {
    let uids = uids
        .iter()
        .map(|u| privs::lookup_user(u.trim()).map(|(u, _)| u.as_raw()))
        .collect::<Result<Vec<_>, _>>()?;
    let gids = gids
        .iter()
        .map(|g| privs::lookup_group(g.trim()).map(|g| g.as_raw()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(access::AllowList::new(uids, gids))
}

/// Everything between binding the socket and serving.
fn start(
    cli: &Cli,
    listener: &listen::Listener,
    metrics_listener: Option<&listen::Listener>,
    pidfile_path: Option<&Path>,
    ids: Ids,
    access: Access,
    detached: &mut Option<daemonize::Detached>,
) -> anyhow::Result<Started> {
    if cli.daemon {
        *detached = Some(daemonize::daemonize()?);
    }
    let pidfile = pidfile_path.map(pidfile::write_pidfile).transpose()?;

    // Device-mapper is opened while still privileged. libmpathpersist is
    // loaded in the background once serving (loading it and the libraries
    // under it is most of a multipath host's start-up), except with -u:
    // then it is loaded now, as root (see `Loaded::load`'s warning).
    let runs_as_root =
        ids.uid.is_none_or(|u| u.is_root()) && nix::unistd::Uid::effective().is_root();
    let mpath = match backend::dm::DmControl::open() {
        Err(e) => Mpath::Off(backend::multipath::no_device_mapper(&e)),
        Ok(_) if !backend::multipath::library::installed(mpath_sys::DEFAULT_LIBRARY) => Mpath::Off(
            backend::multipath::no_library(&format!("{} not found", mpath_sys::DEFAULT_LIBRARY)),
        ),
        Ok(dm) if runs_as_root => Mpath::Later(Arc::new(dm)),
        Ok(dm) => {
            let dm = Arc::new(dm);
            let loaded = backend::multipath::Loaded::load(
                Arc::clone(&dm),
                runs_as_root,
                cli.sgio_timeout,
                journal::stderr_is_journal(),
            );
            Mpath::Now(dm, loaded)
        }
    };
    let multipath = match &mpath {
        Mpath::Off(_) => false,
        Mpath::Now(_, l) => l.multipath.is_some(),
        Mpath::Later(_) => true,
    };
    let keep: &[u32] = if multipath {
        &[privs::CAP_SYS_RAWIO, privs::CAP_SYS_ADMIN]
    } else {
        &[privs::CAP_SYS_RAWIO]
    };
    // While setrlimit is still allowed: the seccomp filter only lets it read.
    if matches!(mpath, Mpath::Later(_)) {
        raise_fd_limit_for_libmultipath();
    }
    server::raise_fd_limit(
        cli.max_connections as usize,
        server::Config::default().max_workers,
    );
    privs::drop_privileges(ids.uid, ids.gid, keep).context("failed to drop privileges")?;
    // Before the crew's first thread; TSYNC covers any thread a library
    // started, and every later thread inherits the filter.
    seccomp::install(access.seccomp)?;

    let features = if cli.enable_cleanup {
        wire::FEATURE_CLEANUP
    } else {
        0
    };
    let sgio = backend::sgio::SgIo {
        timeout_ms: cli.sgio_timeout,
    };
    // With metrics, each PR OUT on a map is followed by a count of the
    // map's registrations (READ KEYS on the map).
    let with_metrics = cli.metrics_socket.is_some() || cli.metrics_file.is_some();
    let counting = move |m: Option<backend::multipath::Multipath>| {
        m.map(|mut m| {
            m.registration_checks = with_metrics;
            m
        })
    };
    let (router, summary, loaded_now) = match mpath {
        Mpath::Off(why) => (backend::router::Router::ready(sgio, None, None), why, None),
        Mpath::Now(dm, loaded) => {
            for f in &loaded.fixes {
                log::info!("multipath: for this libmpathpersist, reservd does itself: {f}");
            }
            let summary = loaded.summary.clone();
            let multipath = counting(loaded.multipath);
            let router = backend::router::Router::ready(sgio, Some(Box::new(dm)), multipath);
            (router, summary, Some(loaded.warnings))
        }
        Mpath::Later(dm) => {
            let timeout = cli.sgio_timeout;
            let probe = Arc::clone(&dm);
            let loader: backend::multipath::Loader = Box::new(move || {
                let loaded = backend::multipath::Loaded::load(
                    dm,
                    true,
                    timeout,
                    journal::stderr_is_journal(),
                );
                notify::notify(&format!("STATUS={}", serving_status(&loaded.summary)));
                if loaded.multipath.is_some() {
                    loaded.log();
                } else {
                    // It was found at start-up: something is broken.
                    log::warn!(
                        "multipath support: {}; CAP_SYS_ADMIN was kept for it and stays unused",
                        loaded.summary
                    );
                }
                counting(loaded.multipath)
            });
            let router = backend::router::Router::deferred(sgio, Box::new(probe), loader);
            let summary = "loading libmpathpersist".to_string();
            (router, summary, None)
        }
    };
    let router = Arc::new(router);
    let active = Arc::clone(&router);
    let commands = Arc::new(metrics::CommandMetrics::default());
    let measured = metrics::Measured {
        router: Arc::clone(&router),
        metrics: Arc::clone(&commands),
    };
    let backend = Arc::new(trace::Traced(Arc::new(audit::Audited::new(
        move || active.multipath_active(),
        Arc::new(measured) as Arc<dyn backend::PrBackend>,
    ))));
    let config = server::Config {
        features,
        max_connections: cli.max_connections as usize,
        frame_timeout: (cli.frame_timeout > 0)
            .then(|| std::time::Duration::from_secs(cli.frame_timeout.into())),
        allow: access.allow.clone(),
        watchdog: notify::watchdog_interval().map(|interval| server::Watchdog {
            interval,
            ping: || notify::notify("WATCHDOG=1"),
        }),
        ..Default::default()
    };
    let server_allow = access.allow;
    let mut server = server::Server::new(listener.listener.try_clone()?, backend, config)?;
    server.watch_signals().context("watching signals")?;
    let sources = metrics::Sources {
        commands,
        server: server.stats(),
        router: Arc::clone(&router),
        started: std::time::SystemTime::now(),
    };
    let render: server::metrics_socket::Render = Arc::new(move || metrics::render(&sources));
    if let Some(m) = metrics_listener {
        server
            .serve_metrics(m.listener.try_clone()?, Arc::clone(&render))
            .context("serving the metrics socket")?;
    }
    let metrics_file = match &cli.metrics_file {
        Some(path) => Some(metrics::FileWriter::start(
            path.clone(),
            std::time::Duration::from_secs(cli.metrics_interval.into()),
            render,
        )?),
        None => None,
    };
    log::info!(
        "reservd {} listening{}; features {features:#010x}, SG_IO timeout {} ms, \
         at most {} connections; seccomp {}; multipath support: {}",
        env!("CARGO_PKG_VERSION"),
        if listener.activated {
            " on the socket-activated fd".to_string()
        } else {
            listener
                .created
                .as_ref()
                .map(|(p, _, _)| format!(" on {}", p.display()))
                .unwrap_or_default()
        },
        cli.sgio_timeout,
        cli.max_connections,
        access.seccomp,
        summary,
    );
    for w in loaded_now.iter().flatten() {
        log::warn!("{w}");
    }
    if router.loading_pending() {
        // Under the seccomp filter and with privileges dropped, like every
        // thread. A command for a map that comes first loads it itself, or
        // waits for this thread.
        let r = Arc::clone(&router);
        std::thread::Builder::new()
            .name("reservd-mpath".into())
            .spawn(move || {
                r.load_multipath();
            })
            .context("starting the thread that loads libmpathpersist")?;
    }
    if let Some(a) = &server_allow {
        log::info!(
            "serving only uid 0 and uids {:?}, gids {:?}",
            a.uids,
            a.gids
        );
    }
    if let Some(m) = metrics_listener.and_then(|m| m.created.as_ref()) {
        log::info!("metrics on {}", m.0.display());
    }
    if let Some(p) = &cli.metrics_file {
        log::info!(
            "metrics written to {} every {} s",
            p.display(),
            cli.metrics_interval
        );
    }
    Ok(Started {
        server,
        pidfile,
        status: serving_status(&summary),
        metrics_file,
    })
}

/// The status line systemd shows (`systemctl status reservd`).
fn serving_status(multipath_summary: &str) -> String {
    format!("serving; multipath support: {multipath_summary}")
}
