//! reservd: executes SCSI persistent reservations for QEMU's
//! pr-manager-helper clients.
//!
//! Pure modules (no I/O, no `unsafe`): [`wire`], [`cdb`], [`params`],
//! [`prin`], [`sense`], [`mpath_xlate`], [`mpconf`]. Backends run commands: [`backend`]. The event loop:
//! [`server`]. Start-up and privileges: [`startup`], [`privs`], [`seccomp`],
//! [`access`].
#![deny(unsafe_code)]

pub mod access;
pub mod audit;
pub mod backend;
pub mod cdb;
pub mod cli;
pub mod client;
pub mod logging;
pub mod mpath_xlate;
pub mod mpconf;
pub mod multipathd;
pub mod params;
pub mod pathcheck;
pub mod prin;
pub mod privs;
pub mod report;
pub mod seccomp;
pub mod sense;
pub mod server;
pub mod startup;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::cli::Cli;

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
    let perms = startup::SocketPerms {
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
        (None, true) => Some(PathBuf::from(cli::DEFAULT_PIDFILE)),
        (None, false) => None,
    };
    if let Some(p) = &pidfile_path {
        startup::check_pidfile_free(p)?;
    }

    // Stop signals go to the event loop's signal fd, in every thread.
    server::block_stop_signals().context("blocking signals")?;

    let listener = startup::listen(
        cli.socket.as_deref(),
        Path::new(cli::DEFAULT_SOCKET),
        perms,
        cli::DEFAULT_SOCKET_MODE,
    )?;
    let mut detached = None;
    let started = start(
        &cli,
        &listener,
        pidfile_path.as_deref(),
        ids,
        Access {
            seccomp: seccomp_mode,
            allow,
        },
        &mut detached,
    );
    let (server, pidfile) = match started {
        Ok(s) => s,
        Err(e) => {
            listener.remove();
            if let Some(d) = detached {
                d.failed(&format!("{e:#}"));
            }
            return Err(e);
        }
    };
    startup::notify_ready();
    if let Some(d) = detached {
        d.ready();
    }
    let r = server.run();
    listener.remove();
    drop(pidfile);
    r.context("event loop")
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
    listener: &startup::Listener,
    pidfile_path: Option<&Path>,
    ids: Ids,
    access: Access,
    detached: &mut Option<startup::Detached>,
) -> anyhow::Result<(server::Server, Option<startup::PidFile>)> {
    if cli.daemon {
        *detached = Some(startup::daemonize()?);
    }
    let pidfile = pidfile_path.map(startup::write_pidfile).transpose()?;

    // Device-mapper and libmpathpersist are opened while still privileged.
    let runs_as_root =
        ids.uid.is_none_or(|u| u.is_root()) && nix::unistd::Uid::effective().is_root();
    let mpath = backend::router::MultipathSupport::detect(runs_as_root, cli.sgio_timeout);
    let keep: &[u32] = if mpath.active() {
        &[privs::CAP_SYS_RAWIO, privs::CAP_SYS_ADMIN]
    } else {
        &[privs::CAP_SYS_RAWIO]
    };
    // While setrlimit is still allowed: the seccomp filter only lets it read.
    server::raise_fd_limit(
        cli.max_connections as usize,
        server::Config::default().max_workers,
    );
    privs::drop_privileges(ids.uid, ids.gid, keep).context("failed to drop privileges")?;
    // Before the first worker thread; TSYNC covers any thread a library
    // started, and every later thread inherits the filter.
    seccomp::install(access.seccomp)?;

    let features = if cli.enable_cleanup {
        wire::FEATURE_CLEANUP
    } else {
        0
    };
    let router = backend::router::Router {
        sgio: backend::sgio::SgIo {
            timeout_ms: cli.sgio_timeout,
        },
        mpath: mpath.multipath,
    };
    let backend = Arc::new(logging::Traced(Arc::new(audit::Audited::new(
        router.mpath.is_some(),
        Arc::new(router),
    ))));
    let config = server::Config {
        features,
        max_connections: cli.max_connections as usize,
        frame_timeout: (cli.frame_timeout > 0)
            .then(|| std::time::Duration::from_secs(cli.frame_timeout.into())),
        allow: access.allow.clone(),
        ..Default::default()
    };
    let server_allow = access.allow;
    let mut server = server::Server::new(listener.listener.try_clone()?, backend, config)?;
    server.watch_signals().context("watching signals")?;
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
        mpath.summary,
    );
    for w in &mpath.warnings {
        log::warn!("{w}");
    }
    if let Some(a) = &server_allow {
        log::info!(
            "serving only uid 0 and uids {:?}, gids {:?}",
            a.uids,
            a.gids
        );
    }
    Ok((server, pidfile))
}
