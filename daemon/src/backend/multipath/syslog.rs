//! multipath-tools' own log messages, in reservd's log at their level.
//!
//! libmpathpersist, libmultipath and libmpathutil log through `condlog`.
//! With their `logsink` set to syslog (reservd sets it when it loads the
//! library, see [`super::library`]), every message reaches the C library's
//! `vsyslog` with its syslog priority: libmultipath's level plus 3 (0 is
//! LOG_ERR, 1 LOG_WARNING, 2 LOG_NOTICE, 3 LOG_INFO, 4 LOG_DEBUG), or its
//! fortified form `__vsyslog_chk` when the libraries were built with
//! `_FORTIFY_SOURCE` (Debian's are). reservd's executable defines
//! [`vsyslog`] and [`__vsyslog_chk`] and exports them (`build.rs` passes
//! `--export-dynamic-symbol` to the linker), so the dynamic loader binds
//! the libraries' calls to them rather than to the C library's, and
//! each message goes to reservd's own log, target [`TARGET`], at the level
//! its priority says ([`level`]): errors and warnings by default, notices
//! with `-v`, info lines with `-vv`, and under systemd they carry their
//! journal priority like reservd's own lines (`RUST_LOG=multipath=off`
//! silences them). Nothing else in reservd calls `vsyslog`.
//!
//! Only reservd sets the libraries' `logsink` to syslog
//! ([`super::library::Libmpathpersist::log_to_syslog`]); reservdctl leaves it
//! alone, and the libraries print their messages on its stderr, as
//! multipath-tools' own commands do.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};

/// The log target of multipath-tools' messages.
pub const TARGET: &str = "multipath";

/// The longest message kept; longer ones are cut (libmultipath's lines
/// are short).
const MESSAGE_SIZE: usize = 1024;

extern "C" {
    /// `int vsnprintf(char *, size_t, const char *, va_list)`. A `va_list`
    /// argument is passed as a pointer on x86_64 (an array of one
    /// `__va_list_tag`) and on aarch64 (a 32-byte structure, passed by
    /// reference as every composite over 16 bytes is): the same pointer
    /// reservd's `vsyslog` received.
    fn vsnprintf(s: *mut c_char, n: usize, format: *const c_char, ap: *mut c_void) -> c_int;
}

/// reservd's level for a syslog priority (its low three bits).
pub fn level(priority: c_int) -> log::Level {
    match priority & 7 {
        0..=3 => log::Level::Error,
        4 => log::Level::Warn,
        5 => log::Level::Info,
        6 => log::Level::Debug,
        _ => log::Level::Trace,
    }
}

/// A message as multipath-tools formats it, without its trailing newline.
pub fn tidy(message: &str) -> &str {
    message.trim_end_matches(['\n', '\r', ' '])
}

/// The C library's `vsyslog`, as reservd's executable defines it: the
/// message goes to reservd's log.
///
/// # Safety
/// Called by C code as `vsyslog(3)`: `format` is a printf format string and
/// `ap` the `va_list` of its arguments, both valid for the call.
#[no_mangle]
pub unsafe extern "C" fn vsyslog(priority: c_int, format: *const c_char, ap: *mut c_void) {
    // SAFETY: the arguments are the caller's, as this function's contract.
    unsafe { log_message(priority, format, ap) }
}

/// `__vsyslog_chk`, what `vsyslog` becomes in C code built with
/// `_FORTIFY_SOURCE`; `flag` asks for format checks, which formatting with
/// `vsnprintf` does not need.
///
/// # Safety
/// As [`vsyslog`].
#[no_mangle]
pub unsafe extern "C" fn __vsyslog_chk(
    priority: c_int,
    _flag: c_int,
    format: *const c_char,
    ap: *mut c_void,
) {
    // SAFETY: the arguments are the caller's, as this function's contract.
    unsafe { log_message(priority, format, ap) }
}

/// Format the message and log it at the level of `priority`.
///
/// # Safety
/// `format` is a printf format string and `ap` the `va_list` of its
/// arguments, both valid for the call.
unsafe fn log_message(priority: c_int, format: *const c_char, ap: *mut c_void) {
    let level = level(priority);
    if format.is_null() || !log::log_enabled!(target: TARGET, level) {
        return;
    }
    let mut buf = [0u8; MESSAGE_SIZE];
    // SAFETY: `buf` has MESSAGE_SIZE writable bytes, vsnprintf writes at
    // most that many including the NUL; `format` and `ap` are the caller's,
    // valid for this call (the function's contract).
    let n = unsafe { vsnprintf(buf.as_mut_ptr().cast(), buf.len(), format, ap) };
    if n < 0 {
        return;
    }
    let text = CStr::from_bytes_until_nul(&buf)
        .map(|c| c.to_string_lossy())
        .unwrap_or_default();
    log::log!(target: TARGET, level, "{}", tidy(&text));
}

/// Whether the C libraries' calls to `vsyslog` reach [`vsyslog`]: the
/// first definition the dynamic loader finds is this one (the executable
/// exports it).
pub fn routes_library_messages() -> bool {
    type Vsyslog = unsafe extern "C" fn(c_int, *const c_char, *mut c_void);
    type VsyslogChk = unsafe extern "C" fn(c_int, c_int, *const c_char, *mut c_void);
    let ours = [
        (c"vsyslog", vsyslog as Vsyslog as *mut c_void),
        (c"__vsyslog_chk", __vsyslog_chk as VsyslogChk as *mut c_void),
    ];
    ours.iter().all(|(name, f)| {
        // SAFETY: dlsym only looks the name up; the name is NUL-terminated.
        let found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        std::hint::black_box(*f) == found
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_map_to_levels() {
        // condlog levels 0..=4 arrive as priorities 3..=7.
        let got: Vec<log::Level> = (3..=7).map(level).collect();
        assert_eq!(
            got,
            vec![
                log::Level::Error,
                log::Level::Warn,
                log::Level::Info,
                log::Level::Debug,
                log::Level::Trace
            ]
        );
        // A facility in the upper bits is ignored; emergencies are errors.
        assert_eq!(level((3 << 3) | 4), log::Level::Warn);
        assert_eq!(level(0), log::Level::Error);
    }

    #[test]
    fn trailing_newlines_go() {
        assert_eq!(
            tidy("mpatha: sdb path not up. Skip.\n"),
            "mpatha: sdb path not up. Skip."
        );
        assert_eq!(tidy("x \r\n"), "x");
        assert_eq!(tidy(""), "");
    }
}
