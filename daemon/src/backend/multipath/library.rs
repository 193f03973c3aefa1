//! libmpathpersist, loaded at run time: the only place reservd calls into
//! it.
//!
//! [`Libmpathpersist::load`] opens `libmpathpersist.so.0`, calls
//! `libmpathpersist_init()` once and sets `mpath_mx_alloc_len` to 8192 (the
//! PR IN allocation length the library asks the paths for, which is also
//! the protocol's largest payload). Dropping it calls
//! `libmpathpersist_exit()`. The library is never unloaded: libmultipath
//! and its dependencies leave thread-exit and atexit hooks behind.
//!
//! Calls are serialised by one mutex. libmpathpersist 0.8.6 and later
//! document `mpath_persistent_reserve_in/out` as thread-safe, but every
//! call writes the library-wide `libmp_verbosity`, all calls share one
//! libudev context (libudev is not thread-safe) and libdevmapper's global
//! state, 0.8.2 to 0.8.5 are not thread-safe at all, and commands on one
//! LU are ordered at the target anyway. Each call runs on the server
//! thread running that command, so a slow multipath command delays other
//! multipath commands, and the event loop only until the crew's standby
//! takes it over (1 to 2 ms), never SG_IO clients beyond that.
//!
//! Only call into the library for file descriptors that
//! [`crate::backend::dm::DmControl::probe`] has shown to be multipath maps:
//! libmultipath `exit(1)`s the process when device-mapper is unreachable at
//! its first DM operation.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::raw::{c_int, c_uint, c_void};
use std::sync::Mutex;

use mpath_sys::libloading::Library;
use mpath_sys::{prin_resp, prout_param_descriptor, transportid, LibMpathPersist};

use reservd_proto::mpath_xlate::{prin_buffer_size, ProutRequest, TRANSPORTID_SIZE};

const _: () = assert!(std::mem::size_of::<transportid>() == TRANSPORTID_SIZE);
const _: () = assert!(std::mem::align_of::<transportid>() == 1);
const _: () =
    assert!(std::mem::size_of::<prin_resp>() == reservd_proto::mpath_xlate::PRIN_RESP_SIZE);
const _: () = assert!(
    std::mem::size_of::<mpath_sys::prin_fulldescr>() == reservd_proto::mpath_xlate::FULLDESCR_SIZE
);
const _: () = assert!(std::mem::align_of::<prout_param_descriptor>() <= 8);
const _: () = assert!(std::mem::align_of::<prin_resp>() <= 8);

// The header's return codes and limits are reservd-proto's (mpath and the
// TransportID parser); 16 and 17, which only newer headers define, are
// reservd-proto's alone.
const _: () = {
    use reservd_proto::mpath;
    assert!(mpath_sys::MPATH_PR_SKIP == mpath::SKIP);
    let codes = [
        (mpath_sys::MPATH_PR_SUCCESS, mpath::SUCCESS),
        (mpath_sys::MPATH_PR_SYNTAX_ERROR, mpath::SYNTAX_ERROR),
        (mpath_sys::MPATH_PR_SENSE_NOT_READY, mpath::SENSE_NOT_READY),
        (
            mpath_sys::MPATH_PR_SENSE_MEDIUM_ERROR,
            mpath::SENSE_MEDIUM_ERROR,
        ),
        (
            mpath_sys::MPATH_PR_SENSE_HARDWARE_ERROR,
            mpath::SENSE_HARDWARE_ERROR,
        ),
        (mpath_sys::MPATH_PR_ILLEGAL_REQ, mpath::ILLEGAL_REQ),
        (
            mpath_sys::MPATH_PR_SENSE_UNIT_ATTENTION,
            mpath::SENSE_UNIT_ATTENTION,
        ),
        (
            mpath_sys::MPATH_PR_SENSE_INVALID_OP,
            mpath::SENSE_INVALID_OP,
        ),
        (
            mpath_sys::MPATH_PR_SENSE_ABORTED_COMMAND,
            mpath::SENSE_ABORTED_COMMAND,
        ),
        (mpath_sys::MPATH_PR_NO_SENSE, mpath::NO_SENSE),
        (mpath_sys::MPATH_PR_SENSE_MALFORMED, mpath::SENSE_MALFORMED),
        (mpath_sys::MPATH_PR_RESERV_CONFLICT, mpath::RESERV_CONFLICT),
        (mpath_sys::MPATH_PR_FILE_ERROR, mpath::FILE_ERROR),
        (mpath_sys::MPATH_PR_DMMP_ERROR, mpath::DMMP_ERROR),
        (mpath_sys::MPATH_PR_THREAD_ERROR, mpath::THREAD_ERROR),
        (mpath_sys::MPATH_PR_OTHER, mpath::OTHER),
    ];
    let mut i = 0;
    while i < codes.len() {
        assert!(codes[i].0 as i32 == codes[i].1);
        i += 1;
    }
    assert!(mpath_sys::MPATH_MX_TIDS as usize == reservd_proto::params::MAX_TRANSPORT_IDS);
    assert!(mpath_sys::MPATH_MAX_PARAM_LEN as usize == reservd_proto::mpath_xlate::MAX_PARAM_LEN);
};

/// The PR IN allocation length reservd sets.
pub const MX_ALLOC_LEN: c_uint = 8192;

/// What reservd needs from libmpathpersist; [`Libmpathpersist`] is the
/// real one, tests use fakes.
pub trait PersistLib: Send + Sync {
    /// `mpath_persistent_reserve_in`: the `MPATH_PR_*` code and the
    /// response buffer (at least [`prin_buffer_size`] bytes, zeroed before
    /// the call) as the library left it.
    fn reserve_in(&self, fd: BorrowedFd<'_>, sa: u8) -> (i32, Vec<u8>);
    /// `mpath_persistent_reserve_out`: the `MPATH_PR_*` code.
    fn reserve_out(&self, fd: BorrowedFd<'_>, req: &ProutRequest) -> i32;
}

/// Why libmpathpersist cannot be used.
#[derive(Debug)]
pub enum LoadError {
    /// The library (or one of its symbols) could not be loaded.
    Missing(String),
    /// `libmpathpersist_init()` failed.
    Init,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Missing(e) => write!(f, "{e}"),
            LoadError::Init => write!(f, "libmpathpersist_init() failed"),
        }
    }
}

/// The loaded, initialised library.
pub struct Libmpathpersist {
    api: ManuallyDrop<LibMpathPersist>,
    lock: Mutex<()>,
    verbose: c_int,
    version: Option<(u32, u32, u32)>,
    path: Option<String>,
}

impl Libmpathpersist {
    /// Load `library` (normally [`mpath_sys::DEFAULT_LIBRARY`]) and
    /// initialise it. `verbose` is libmultipath's log level (0..=4) for
    /// the messages it prints on stderr.
    pub fn load(library: &str, verbose: c_int) -> Result<Libmpathpersist, LoadError> {
        // SAFETY: loading libmpathpersist runs its and its dependencies'
        // ELF constructors, which only set up their own state.
        let api = unsafe { LibMpathPersist::new(library) }
            .map_err(|e| LoadError::Missing(format!("{library}: {e}")))?;
        let api = ManuallyDrop::new(api);
        // A second handle on the same (reference-counted) object, for the
        // variable; never closed either.
        // SAFETY: as above; the object is already loaded.
        let handle = ManuallyDrop::new(
            unsafe { Library::new(library) }
                .map_err(|e| LoadError::Missing(format!("{library}: {e}")))?,
        );
        // SAFETY: `handle` is libmpathpersist.
        let alloc_len = unsafe { mpath_sys::mpath_mx_alloc_len(&handle) }
            .map_err(|e| LoadError::Missing(format!("{library}: {e}")))?;
        // SAFETY: the library is loaded and not yet initialised; the call
        // takes no arguments. It reads /etc/multipath.conf and raises
        // RLIMIT_NOFILE.
        if unsafe { api.libmpathpersist_init() } != 0 {
            return Err(LoadError::Init);
        }
        // SAFETY: `alloc_len` points at the library's `unsigned int`; no
        // other thread uses the library yet.
        unsafe { alloc_len.write(MX_ALLOC_LEN) };
        let path = loaded_path(api.libmpathpersist_init as *const c_void);
        Ok(Libmpathpersist {
            version: multipath_tools_version(),
            api,
            lock: Mutex::new(()),
            verbose,
            path,
        })
    }

    /// Send multipath-tools' own messages to syslog with their priorities:
    /// into reservd's log when the executable defines `vsyslog` (see
    /// [`super::syslog`]), else (under systemd) to the journal's syslog
    /// socket, rather than onto stderr with a timestamp of their own and
    /// no level. Call it before the first command. `stderr_is_journal`:
    /// whether reservd's stderr is the journal.
    pub fn log_to_syslog(&self, stderr_is_journal: bool) {
        let routed = super::syslog::routes_library_messages();
        if !(routed || stderr_is_journal) {
            return;
        }
        if !library_logs_to_syslog() {
            log::warn!("multipath-tools' messages stay on stderr: its logsink was not found");
        } else if routed {
            log::debug!(
                "multipath-tools' messages go to reservd's log, target '{}'",
                super::syslog::TARGET
            );
        }
    }

    /// multipath-tools' version, from libmultipath (0.8.6 and later).
    pub fn version(&self) -> Option<(u32, u32, u32)> {
        self.version
    }

    /// The file the dynamic loader picked.
    pub fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }

    /// "0.9.4" or "unknown version".
    pub fn version_string(&self) -> String {
        match self.version {
            Some((a, b, c)) => format!("{a}.{b}.{c}"),
            None => "unknown version".to_string(),
        }
    }
}

/// Whether the dynamic loader would find `name` (a plain file name such as
/// `libmpathpersist.so.0`), judged without loading it: listed in
/// `/etc/ld.so.cache`, or present in a directory of `LD_LIBRARY_PATH` or
/// the loader's default ones. Lets start-up decide, while privileged,
/// whether the library is worth keeping CAP_SYS_ADMIN for before it is
/// loaded in the background.
pub fn installed(name: &str) -> bool {
    let cached = std::fs::read("/etc/ld.so.cache").is_ok_and(|cache| {
        let needle = format!("/{name}\0");
        cache.windows(needle.len()).any(|w| w == needle.as_bytes())
    });
    let env = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    cached
        || env
            .split(':')
            .filter(|d| !d.is_empty())
            .chain(["/lib", "/usr/lib", "/lib64", "/usr/lib64"])
            .any(|d| std::path::Path::new(d).join(name).is_file())
}

/// A library libmpathpersist loaded as a dependency (libmultipath,
/// libmpathutil), for its symbols; `None` if this version has none by that
/// name. The handle is never closed.
fn dependency(name: &str) -> Option<ManuallyDrop<Library>> {
    // SAFETY: called only once libmpathpersist is loaded: `name` is one of
    // its dependencies, already loaded, so opening it again only takes a
    // reference and runs no constructor.
    unsafe { Library::new(name) }.ok().map(ManuallyDrop::new)
}

/// Point multipath-tools' `logsink` at syslog. Called once the library is
/// initialised and before any command uses it.
fn library_logs_to_syslog() -> bool {
    for name in [mpath_sys::LIBMPATHUTIL, mpath_sys::LIBMULTIPATH] {
        let Some(lib) = dependency(name) else {
            continue;
        };
        // SAFETY: `lib` is libmpathutil or libmultipath.
        if let Ok(sink) = unsafe { mpath_sys::logsink(&lib) } {
            // SAFETY: `sink` points at the library's `int logsink`; no other
            // thread uses the library yet.
            unsafe { sink.write(mpath_sys::LOGSINK_SYSLOG) };
            return true;
        }
    }
    false
}

/// libmultipath's own version. It is called only after
/// `libmpathpersist_init()`, with device-mapper known to be present (it
/// queries the kernel's DM versions on first use).
fn multipath_tools_version() -> Option<(u32, u32, u32)> {
    let lib = dependency(mpath_sys::LIBMULTIPATH)?;
    // SAFETY: libmultipath 0.8.6+ exports `libmp_get_version` with this
    // signature (older ones do not export it, and lookup fails).
    let f = unsafe { mpath_sys::libmp_get_version(&lib) }.ok()?;
    let mut v: [c_uint; 3] = [0; 3];
    // SAFETY: `v` has room for the three numbers the function writes.
    let r = unsafe { f(mpath_sys::MULTIPATH_VERSION, v.as_mut_ptr()) };
    (r == 0).then_some((v[0], v[1], v[2]))
}

/// The path of the shared object containing `addr`.
fn loaded_path(addr: *const c_void) -> Option<String> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: dladdr only reads `addr` as a number and fills `info`.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the loader,
    // valid while the object is loaded (it never is unloaded).
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    let name = name.to_string_lossy().into_owned();
    Some(std::fs::canonicalize(&name).map_or(name, |p| p.display().to_string()))
}

impl PersistLib for Libmpathpersist {
    fn reserve_in(&self, fd: BorrowedFd<'_>, sa: u8) -> (i32, Vec<u8>) {
        let size = prin_buffer_size(sa);
        // u64 words: the library's structs need 8-byte alignment.
        let mut words = vec![0u64; size.div_ceil(8)];
        let code = {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: `words` is zeroed, 8-aligned and `size` bytes or more:
            // a prin_resp, plus (READ FULL STATUS) room for everything the
            // library's decoder writes (see mpath_xlate). `fd` is an open
            // multipath map. Calls are serialised by `lock`.
            unsafe {
                self.api.mpath_persistent_reserve_in(
                    fd.as_raw_fd(),
                    c_int::from(sa),
                    words.as_mut_ptr() as *mut prin_resp,
                    0,
                    self.verbose,
                )
            }
        };
        let bytes = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        (code, bytes)
    }

    fn reserve_out(&self, fd: BorrowedFd<'_>, req: &ProutRequest) -> i32 {
        let n = req.transport_ids.len();
        // The TransportIDs, each a `struct transportid` (alignment 1).
        let mut tids: Vec<[u8; TRANSPORTID_SIZE]> = req.transport_ids.clone();
        let size = std::mem::size_of::<prout_param_descriptor>()
            + n * std::mem::size_of::<*mut transportid>();
        let mut words = vec![0u64; size.div_ceil(8)];
        let pd = words.as_mut_ptr() as *mut prout_param_descriptor;
        // SAFETY: `words` is zeroed, 8-aligned and large enough for the
        // descriptor plus `n` pointers in its flexible array; the pointers
        // reference `tids`, which outlives the call below.
        unsafe {
            (*pd).key.copy_from_slice(&req.header[0..8]);
            (*pd).sa_key.copy_from_slice(&req.header[8..16]);
            (*pd).sa_flags = req.header[20];
            (*pd).num_transportid = n as u32;
            let list = (*pd).trnptid_list.as_mut_slice(n);
            for (slot, t) in list.iter_mut().zip(tids.iter_mut()) {
                *slot = t.as_mut_ptr() as *mut transportid;
            }
        }
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `pd` is the descriptor built above; `fd` is an open
        // multipath map; calls are serialised by `lock`.
        unsafe {
            self.api.mpath_persistent_reserve_out(
                fd.as_raw_fd(),
                c_int::from(req.service_action),
                c_int::from(req.scope),
                c_uint::from(req.pr_type),
                pd,
                0,
                self.verbose,
            )
        }
    }
}

impl Drop for Libmpathpersist {
    fn drop(&mut self) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the library was initialised in `load` and no call is in
        // flight (we hold the lock and are being dropped).
        unsafe { self.api.libmpathpersist_exit() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_not_a_crash() {
        let e = Libmpathpersist::load("libreservd-does-not-exist.so.0", 0)
            .err()
            .expect("must fail");
        assert!(matches!(e, LoadError::Missing(_)));
        assert!(e.to_string().contains("libreservd-does-not-exist"), "{e}");
    }

    #[test]
    fn installed_agrees_with_the_loader() {
        // libc is always there, a made-up name never is.
        assert!(installed("libc.so.6"));
        assert!(!installed("libreservd-does-not-exist.so.0"));
        // libmpathpersist: where it loads, it is found (and the reverse).
        // SAFETY: only the libraries' ELF constructors run; nothing is
        // called, and the handle is closed at once.
        let loads = unsafe { Library::new(mpath_sys::DEFAULT_LIBRARY) }.is_ok();
        assert_eq!(installed(mpath_sys::DEFAULT_LIBRARY), loads);
    }

    #[test]
    fn loaded_path_finds_libc() {
        let p = loaded_path(libc::getpid as *const c_void).expect("dladdr");
        assert!(p.contains("libc"), "{p}");
    }
}
