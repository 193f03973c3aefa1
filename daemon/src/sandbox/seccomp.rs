//! The seccomp allow-list reservd runs under once start-up is done.
//!
//! After privileges are dropped, reservd installs a seccomp filter on every
//! thread of the process (SECCOMP_FILTER_FLAG_TSYNC; threads started later
//! inherit it) that lets through only the system calls serving clients
//! needs: the event loop (epoll, eventfd, signalfd, the crew's timerfd,
//! accept4, recvmsg/sendmsg with SCM_RIGHTS), the server's threads
//! (clone/clone3, futex, mmap...),
//! SG_IO, the read-only device-mapper ioctls and DM_DEV_SUSPEND (suspending
//! and resuming a map around a PREEMPT of its own key: reservd's own, and
//! libmpathpersist's from multipath-tools 0.13), and what libmpathpersist
//! and the libraries under it do while running a command: open the path
//! devices, read sysfs and `/dev/mapper` through libudev, talk to
//! multipathd over an AF_UNIX socket, start one thread per path, use
//! System V semaphores through libdevmapper's udev synchronisation.
//!
//! Arguments are checked where they decide what a call can reach:
//! - `ioctl` only with the request numbers in [`IOCTLS`];
//! - `socket` only for AF_UNIX (multipathd, logging to a socket) and
//!   AF_NETLINK (libudev);
//! - `tgkill`/`tkill` only towards reservd's own threads (glibc's
//!   `abort` and `raise`), never another process;
//! - `prctl` only PR_SET_NAME/PR_GET_NAME (naming threads) and
//!   PR_CAPBSET_READ (libcap's constructor, when libmpathpersist loads);
//! - `prlimit64` only reading limits.
//!
//! What a refused call does depends on `--seccomp`:
//! - `enforce` (the default): the call fails with EPERM and does nothing.
//!   reservd does not kill itself on a refused call: the filter also covers
//!   libmpathpersist, libmultipath, libdevmapper and libudev, whose system
//!   calls vary with their versions and configuration; a call missing
//!   from the list then fails one PR command (an error answer, logged)
//!   instead of killing the daemon and every guest's reservation service
//!   with it. The protection is the same: the call does not happen.
//! - `log`: the call is let through and the kernel logs it (an audit
//!   record of type 1326, SECCOMP, in the kernel log or the audit log),
//!   to find what a new library version needs.
//! - `off`: no filter.

use std::collections::BTreeMap;

use crate::backend::dm;
use anyhow::Context;
use reservd_proto::sg;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What `--seccomp` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Refused calls fail with EPERM.
    Enforce,
    /// Refused calls are allowed and logged by the kernel.
    Log,
    /// No filter.
    Off,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("invalid seccomp mode '{s}' (enforce, log or off)")),
        }
    }
}

/// The device-mapper ioctls reservd lets through: those that only read,
/// reservd's own (DM_VERSION, DM_TABLE_STATUS) and libdevmapper's for
/// libmpathpersist (listing the maps, their status, tables and
/// dependencies, target versions), and DM_DEV_SUSPEND, which suspends and
/// resumes a map (never loads or removes one).
pub const DM_IOCTLS: &[(u64, &str)] = &[
    (dm::DM_VERSION, "DM_VERSION"),
    (dm::DM_LIST_DEVICES, "DM_LIST_DEVICES"),
    (dm::DM_DEV_SUSPEND, "DM_DEV_SUSPEND"),
    (dm::DM_DEV_STATUS, "DM_DEV_STATUS"),
    (dm::DM_TABLE_DEPS, "DM_TABLE_DEPS"),
    (dm::DM_TABLE_STATUS, "DM_TABLE_STATUS"),
    (dm::DM_LIST_VERSIONS, "DM_LIST_VERSIONS"),
    (dm::DM_GET_TARGET_VERSION, "DM_GET_TARGET_VERSION"),
];

/// `BLKBSZGET`, `_IOR(0x12, 112, size_t)`: the block device's soft block
/// size, read-only (64-bit `size_t`).
const BLKBSZGET: u64 = 0x8008_1270;

/// Every ioctl request reservd lets through.
pub const IOCTLS: &[(u64, &str)] = &[
    (sg::SG_IO, "SG_IO"),
    // sg3_utils-style callers (libmultipath's path checks) ask first.
    (sg::SG_GET_VERSION_NUM, "SG_GET_VERSION_NUM"),
    // The directio path checker sizes its aligned read by the block size.
    (BLKBSZGET, "BLKBSZGET"),
    // std's set_nonblocking and close-on-exec, isatty for the logger
    // (asm-generic numbers: x86_64, aarch64, riscv64).
    (0x5421, "FIONBIO"),
    (0x5451, "FIOCLEX"),
    (0x5450, "FIONCLEX"),
    (0x5401, "TCGETS"),
    (0x5413, "TIOCGWINSZ"),
];

/// `io_pgetevents`, which the libc crate does not name on every target.
#[cfg(target_arch = "x86_64")]
const SYS_IO_PGETEVENTS: libc::c_long = 333;
#[cfg(not(target_arch = "x86_64"))]
const SYS_IO_PGETEVENTS: libc::c_long = 292;

/// System calls allowed whatever their arguments.
fn plain_syscalls() -> Vec<i64> {
    let mut v: Vec<libc::c_long> = vec![
        // I/O on descriptors.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fcntl,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_pipe2,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_flock,
        // Files: path devices, sysfs, /etc/multipath.conf, /dev/mapper.
        libc::SYS_openat,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fstatfs,
        libc::SYS_statfs,
        libc::SYS_getdents64,
        libc::SYS_readlinkat,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_getcwd,
        // libmultipath's open_file(): creates the directories of
        // /etc/multipath/{wwids,prkeys} if missing (EEXIST otherwise).
        libc::SYS_mkdirat,
        // The socket file is removed at exit.
        libc::SYS_unlinkat,
        // --metrics-file: the new text is written to a temporary file,
        // made readable by the collector (0644) and renamed over the file.
        libc::SYS_fchmod,
        libc::SYS_renameat2,
        // Memory.
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_membarrier,
        // Threads and synchronisation.
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_get_robust_list,
        libc::SYS_rseq,
        libc::SYS_set_tid_address,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_restart_syscall,
        // libmultipath's lock_file(): a SIGALRM timeout on F_SETLKW.
        libc::SYS_setitimer,
        libc::SYS_getitimer,
        // Linux AIO: libmultipath's directio path checker, the default for
        // LIO and Hitachi Hi-SDS devices from multipath-tools 0.9.5 on,
        // which libmpathpersist runs on each path before a command.
        libc::SYS_io_setup,
        libc::SYS_io_destroy,
        libc::SYS_io_submit,
        libc::SYS_io_getevents,
        // libaio 0.3.113 and later (Debian 13 on) reap with io_pgetevents.
        SYS_IO_PGETEVENTS,
        libc::SYS_io_cancel,
        // libdevmapper's udev synchronisation.
        libc::SYS_semget,
        libc::SYS_semop,
        libc::SYS_semtimedop,
        libc::SYS_semctl,
        // Signals.
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_signalfd4,
        // The event loop.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_ppoll,
        libc::SYS_pselect6,
        // Sockets: the listener, clients, multipathd, the journal.
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        // Identity, time, randomness.
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getppid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_getresuid,
        libc::SYS_getresgid,
        libc::SYS_getgroups,
        libc::SYS_capget,
        libc::SYS_uname,
        libc::SYS_sysinfo,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettimeofday,
        libc::SYS_getrandom,
        libc::SYS_getrusage,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_open,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_access,
        libc::SYS_readlink,
        libc::SYS_unlink,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_mkdir,
        libc::SYS_alarm,
        libc::SYS_dup2,
        libc::SYS_pipe,
        libc::SYS_poll,
        libc::SYS_select,
        libc::SYS_epoll_wait,
        libc::SYS_accept,
        libc::SYS_arch_prctl,
        libc::SYS_getdents,
        libc::SYS_time,
    ]);
    v
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> anyhow::Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .context("building a seccomp condition")
}

fn rule(conds: Vec<SeccompCondition>) -> anyhow::Result<SeccompRule> {
    SeccompRule::new(conds).context("building a seccomp rule")
}

/// One rule per value: the call is allowed when argument `arg` equals any
/// of `values`.
fn arg_in(arg: u8, values: impl IntoIterator<Item = u64>) -> anyhow::Result<Vec<SeccompRule>> {
    values
        .into_iter()
        .map(|v| rule(vec![cond(arg, SeccompCmpOp::Eq, v)?]))
        .collect()
}

/// The rules of the allow-list, for the process `pid` (the target of the
/// signals reservd may send itself).
fn rules(pid: u32) -> anyhow::Result<BTreeMap<i64, Vec<SeccompRule>>> {
    use SeccompCmpOp::Eq;
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in plain_syscalls() {
        map.insert(nr, vec![]);
    }
    // ioctl(fd, request, ...): the request is an unsigned int to the kernel.
    let requests = IOCTLS.iter().chain(DM_IOCTLS).map(|&(req, _)| req);
    map.insert(libc::SYS_ioctl, arg_in(1, requests)?);
    map.insert(
        libc::SYS_socket,
        arg_in(0, [libc::AF_UNIX as u64, libc::AF_NETLINK as u64])?,
    );
    map.insert(libc::SYS_socketpair, arg_in(0, [libc::AF_UNIX as u64])?);
    map.insert(libc::SYS_tgkill, arg_in(0, [u64::from(pid)])?);
    map.insert(
        libc::SYS_prctl,
        arg_in(
            0,
            [
                libc::PR_SET_NAME as u64,
                libc::PR_GET_NAME as u64,
                libc::PR_CAPBSET_READ as u64,
            ],
        )?,
    );
    // prlimit64(pid, resource, new_limit = NULL, old_limit): reading only.
    map.insert(
        libc::SYS_prlimit64,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            2,
            SeccompCmpArgLen::Qword,
            Eq,
            0,
        )?])?],
    );
    Ok(map)
}

fn target_arch() -> anyhow::Result<TargetArch> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| anyhow::anyhow!("seccomp filter not available on {}", std::env::consts::ARCH))
}

/// Compile the filter for `mode` (None for `Off`), for the process `pid`.
pub fn build(mode: Mode, pid: u32) -> anyhow::Result<Option<BpfProgram>> {
    let mismatch = match mode {
        Mode::Off => return Ok(None),
        Mode::Enforce => SeccompAction::Errno(libc::EPERM as u32),
        Mode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules(pid)?, mismatch, SeccompAction::Allow, target_arch()?)
        .context("building the seccomp filter")?;
    let prog: BpfProgram = filter.try_into().context("compiling the seccomp filter")?;
    Ok(Some(prog))
}

/// Install the filter for `mode` on every thread of this process. Needs
/// NO_NEW_PRIVS (set when privileges are dropped) or CAP_SYS_ADMIN.
pub fn install(mode: Mode) -> anyhow::Result<()> {
    let Some(prog) = build(mode, std::process::id())? else {
        return Ok(());
    };
    seccompiler::apply_filter_all_threads(&prog).context("installing the seccomp filter")?;
    Ok(())
}

/// Install the filter for `mode` on the calling thread only (tests build
/// the same filter in a child process or thread).
pub fn install_this_thread(mode: Mode, pid: u32) -> anyhow::Result<()> {
    let Some(prog) = build(mode, pid)? else {
        return Ok(());
    };
    seccompiler::apply_filter(&prog).context("installing the seccomp filter")?;
    Ok(())
}
