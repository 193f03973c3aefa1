//! reservd: executes SCSI persistent reservations for QEMU's
//! pr-manager-helper clients.
//!
//! Pure modules (no I/O, no `unsafe`): [`wire`], [`cdb`], [`params`],
//! [`prin`], [`sense`], [`mpath_xlate`], [`mpconf`]. Backends run commands: [`backend`]. The event loop:
//! [`server`]. Start-up and privileges: [`startup`], [`privs`].
#![deny(unsafe_code)]

pub mod backend;
pub mod cdb;
pub mod cli;
pub mod client;
pub mod logging;
pub mod mpath_xlate;
pub mod mpconf;
pub mod multipathd;
pub mod params;
pub mod prin;
pub mod privs;
pub mod sense;
pub mod server;
pub mod startup;
pub mod wire;

use std::sync::Arc;

use anyhow::Context;

use crate::cli::Cli;

/// Run the daemon as the command line says. Returns when it has shut down.
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
    let uid = user.map(|(u, _)| u);
    let gid = group.or(user.and_then(|(_, g)| g));

    // Stop signals go to the event loop's signal fd, in every thread.
    server::block_stop_signals().context("blocking signals")?;

    let listener = startup::listen(
        cli.socket.as_deref(),
        std::path::Path::new(cli::DEFAULT_SOCKET),
    )?;
    if cli.daemon {
        startup::daemonize()?;
    }
    let pidfile = match (&cli.pidfile, cli.daemon) {
        (Some(p), _) => Some(startup::write_pidfile(p)?),
        (None, true) => Some(startup::write_pidfile(std::path::Path::new(
            cli::DEFAULT_PIDFILE,
        ))?),
        (None, false) => None,
    };

    // Device-mapper and libmpathpersist are opened while still privileged.
    let runs_as_root = uid.is_none_or(|u| u.is_root()) && nix::unistd::Uid::effective().is_root();
    let mpath = backend::router::MultipathSupport::detect(runs_as_root, cli.sgio_timeout);
    let keep: &[u32] = if mpath.active() {
        &[privs::CAP_SYS_RAWIO, privs::CAP_SYS_ADMIN]
    } else {
        &[privs::CAP_SYS_RAWIO]
    };
    privs::drop_privileges(uid, gid, keep).context("failed to drop privileges")?;

    let features = if cli.enable_cleanup {
        wire::FEATURE_CLEANUP
    } else {
        0
    };
    let backend = Arc::new(backend::router::Router {
        sgio: backend::sgio::SgIo {
            timeout_ms: cli.sgio_timeout,
        },
        mpath: mpath.multipath,
    });
    let config = server::Config {
        features,
        max_connections: cli.max_connections as usize,
        ..Default::default()
    };
    let mut server = server::Server::new(listener.listener.try_clone()?, backend, config)?;
    server.watch_signals().context("watching signals")?;
    log::info!(
        "reservd {} listening{}; multipath support: {}",
        env!("CARGO_PKG_VERSION"),
        if listener.activated {
            " on the socket-activated fd"
        } else {
            ""
        },
        mpath.summary
    );
    for w in &mpath.warnings {
        log::warn!("{w}");
    }
    startup::notify_ready();
    let r = server.run();
    listener.remove();
    drop(pidfile);
    r.context("event loop")
}
