//! Dropping privileges after start-up.
//!
//! reservd keeps exactly the capabilities it needs and nothing else:
//! - `CAP_SYS_RAWIO`: the kernel refuses PERSISTENT RESERVE IN/OUT through
//!   SG_IO without it;
//! - `CAP_SYS_ADMIN`, only when multipath support is active: the kernel
//!   refuses every device-mapper ioctl on `/dev/mapper/control` without it,
//!   both reservd's own `DM_TABLE_STATUS` (is this fd a multipath map?) and
//!   libmpathpersist's (listing the maps, reading their tables and path
//!   state). Without multipath support reservd issues no DM ioctl and drops
//!   it.
//!
//! `-u`/`-g` and multipath: libmpathpersist opens the path devices
//! (`/dev/sdX`, normally `root:disk 0660`) itself, and multipathd accepts
//! key updates (`setprkey`, needed with `reservation_key file`, and the
//! CLEANUP extension's commands) only from uid 0. Running as another user
//! therefore breaks multipath PR commands unless that user can open the
//! path devices, and still loses multipathd's key bookkeeping; reservd
//! warns at start-up when both are in use.
//!
//! Everything else goes: the bounding set is emptied, supplementary groups
//! are dropped, uid/gid change to `--user`/`--group`, ambient and
//! inheritable sets are emptied, and NO_NEW_PRIVS is set.
#![allow(unsafe_code)]

use std::io;

use nix::unistd::{Gid, Uid};

pub const CAP_SYS_RAWIO: u32 = 17;
pub const CAP_SYS_ADMIN: u32 = 21;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The three capability sets of this thread, as 64-bit masks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

pub fn capget() -> io::Result<CapSets> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData records (the v3 ABI) into `data`,
    // which is exactly that large; `hdr` is a valid header.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok(CapSets {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

fn capset(sets: CapSets) -> io::Result<()> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let split = |m: u64| [m as u32, (m >> 32) as u32];
    let (e, p, i) = (
        split(sets.effective),
        split(sets.permitted),
        split(sets.inheritable),
    );
    let data = [
        CapData {
            effective: e[0],
            permitted: p[0],
            inheritable: i[0],
        },
        CapData {
            effective: e[1],
            permitted: p[1],
            inheritable: i[1],
        },
    ];
    // SAFETY: capset reads two CapData records from `data` (v3 ABI) and
    // the header; both are valid for the duration of the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the prctl options used here (KEEPCAPS, CAPBSET_DROP,
    // CAP_AMBIENT, NO_NEW_PRIVS) take integer arguments only.
    let r = unsafe {
        libc::prctl(
            option,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drop to `keep` capabilities and to `uid`/`gid` (current ones if None).
/// Must run before any other thread is started: capabilities are per
/// thread.
pub fn drop_privileges(uid: Option<Uid>, gid: Option<Gid>, keep: &[u32]) -> anyhow::Result<()> {
    use anyhow::Context;
    let keep_mask: u64 = keep.iter().fold(0, |m, c| m | (1u64 << c));
    let is_root = Uid::effective().is_root();
    let current = capget().context("reading capabilities")?;
    if !is_root
        && (uid.is_some() || gid.is_some())
        && (uid != Some(Uid::current()) || gid != Some(Gid::current()))
    {
        // Changing identity needs root; say so plainly.
        if current.effective & (1 << 6 | 1 << 7) != (1 << 6 | 1 << 7) {
            anyhow::bail!("changing user or group needs root (or CAP_SETUID and CAP_SETGID)");
        }
    }
    // Empty the bounding set first, while CAP_SETPCAP is still effective.
    // It only limits what an execve could gain, and reservd never execs,
    // so the kept capabilities go too (as with qemu-pr-helper).
    if current.effective & (1 << 8) != 0 {
        for cap in 0..=last_cap() {
            prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong)
                .with_context(|| format!("dropping capability {cap} from the bounding set"))?;
        }
    }
    if current.effective & (1 << 6) != 0 {
        nix::unistd::setgroups(&[]).context("dropping supplementary groups")?;
    }
    if let Some(g) = gid {
        nix::unistd::setresgid(g, g, g).with_context(|| format!("switching to gid {g}"))?;
    }
    if let Some(u) = uid {
        prctl(libc::PR_SET_KEEPCAPS, 1).context("PR_SET_KEEPCAPS")?;
        nix::unistd::setresuid(u, u, u).with_context(|| format!("switching to uid {u}"))?;
        prctl(libc::PR_SET_KEEPCAPS, 0).context("PR_SET_KEEPCAPS")?;
    }
    let left = capget().context("reading capabilities")?;
    let kept = keep_mask & left.permitted;
    capset(CapSets {
        effective: kept,
        permitted: kept,
        inheritable: 0,
    })
    .context("setting capabilities")?;
    // Ambient capabilities: clear all (EINVAL on kernels without them).
    let _ = prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    );
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).context("PR_SET_NO_NEW_PRIVS")?;
    if is_root && kept != keep_mask {
        anyhow::bail!(
            "capabilities {:#x} missing after the switch",
            keep_mask & !kept
        );
    }
    Ok(())
}

/// Resolve `--user`: a name, else a decimal uid.
pub fn lookup_user(s: &str) -> Result<(Uid, Option<Gid>), String> {
    match nix::unistd::User::from_name(s) {
        Ok(Some(u)) => Ok((u.uid, Some(u.gid))),
        _ => s
            .parse::<u32>()
            .map(|n| (Uid::from_raw(n), None))
            .map_err(|_| format!("invalid user '{s}'")),
    }
}

/// Resolve `--group`: a name, else a decimal gid.
pub fn lookup_group(s: &str) -> Result<Gid, String> {
    match nix::unistd::Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid),
        _ => s
            .parse::<u32>()
            .map(Gid::from_raw)
            .map_err(|_| format!("invalid group '{s}'")),
    }
}
