//! Logging: env_logger, with qemu-pr-helper's -v/-q levels, QEMU-style
//! trace patterns mapped onto log targets, and journald-friendly output
//! when stderr is connected to the journal.
//!
//! Default level: warnings (`-v` info, `-vv` debug, `-vvv` trace, `-q`
//! errors only). The audit trail ([`AUDIT_TARGET`], one line
//! per PR OUT) is shown at info level even by default; `-q` silences it,
//! and `RUST_LOG=reservd::audit=off` does too.

use std::io::Write;

use log::LevelFilter;

use super::journal::stderr_is_journal;

/// Log target of the `pr_helper_request` event.
pub const REQUEST_TARGET: &str = "reservd::trace::request";
/// Log target of the `pr_helper_result` event.
pub const RESULT_TARGET: &str = "reservd::trace::result";
/// The event loop's own log: connections opened, commands dispatched,
/// connections closed and why.
pub const CONNECTION_TARGET: &str = "reservd_daemon::server";
/// Log target of the audit records (see [`super::audit`]).
pub const AUDIT_TARGET: &str = "reservd::audit";

/// Trace events and the log targets they enable (every level).
pub const TRACE_EVENTS: &[(&str, &str)] = &[
    ("pr_helper_connection", CONNECTION_TARGET),
    ("pr_helper_request", REQUEST_TARGET),
    ("pr_helper_result", RESULT_TARGET),
    // QEMU's client-side event names, accepted as aliases.
    ("pr_manager_execute", REQUEST_TARGET),
    ("pr_manager_run", RESULT_TARGET),
];

/// A parsed `-T` option.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TraceSpec {
    pub patterns: Vec<String>,
    pub events_file: Option<String>,
    pub file: Option<String>,
}

/// Parse `[[enable=]PATTERN][,events=FILE][,file=FILE]`.
pub fn parse_trace(spec: &str) -> Result<TraceSpec, String> {
    let mut t = TraceSpec::default();
    for (i, part) in spec.split(',').enumerate() {
        match part.split_once('=') {
            Some(("enable", p)) => t.patterns.push(p.to_string()),
            Some(("events", f)) => t.events_file = Some(f.to_string()),
            Some(("file", f)) => t.file = Some(f.to_string()),
            Some((k, _)) => return Err(format!("unknown trace option '{k}'")),
            None if i == 0 && !part.is_empty() => t.patterns.push(part.to_string()),
            None if part.is_empty() => {}
            None => return Err(format!("invalid trace option '{part}'")),
        }
    }
    Ok(t)
}

/// Glob match with `*` and `?`, as QEMU's trace patterns.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn rec(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => rec(&p[1..], n) || (!n.is_empty() && rec(p, &n[1..])),
            (Some(b'?'), Some(_)) => rec(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => rec(&p[1..], &n[1..]),
            _ => false,
        }
    }
    rec(pattern.as_bytes(), name.as_bytes())
}

/// Log targets enabled by `patterns`, and the patterns that matched nothing.
pub fn trace_targets(patterns: &[String]) -> (Vec<&'static str>, Vec<String>) {
    let mut targets = Vec::new();
    let mut unknown = Vec::new();
    for p in patterns {
        let p = p.strip_prefix('-').unwrap_or(p);
        let hits: Vec<_> = TRACE_EVENTS
            .iter()
            .filter(|(e, _)| glob_match(p, e))
            .map(|(_, t)| *t)
            .collect();
        if hits.is_empty() {
            unknown.push(p.to_string());
        }
        for t in hits {
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
    }
    (targets, unknown)
}

/// The default level for qemu-pr-helper's -v/-q.
pub fn level(verbose: u8, quiet: bool) -> LevelFilter {
    match (quiet, verbose) {
        (true, _) => LevelFilter::Error,
        (false, 0) => LevelFilter::Warn,
        (false, 1) => LevelFilter::Info,
        (false, 2) => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// The level of the audit target: info, or more with -vv and up.
pub fn audit_level(verbose: u8) -> LevelFilter {
    level(verbose, false).max(LevelFilter::Info)
}

/// Install the logger. Returns warnings to log once it is up.
pub fn init(verbose: u8, quiet: bool, traces: &[String]) -> Result<Vec<String>, String> {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level(verbose, quiet));
    let mut warnings = Vec::new();
    let mut patterns = Vec::new();
    let mut log_file = None;
    for spec in traces {
        let t = parse_trace(spec)?;
        patterns.extend(t.patterns);
        if let Some(f) = t.events_file {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| format!("cannot read trace events file {f}: {e}"))?;
            patterns.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        if t.file.is_some() {
            log_file = t.file;
        }
    }
    // The audit trail (one line per PR OUT) is on by default; -q hides it.
    if !quiet {
        builder.filter_module(AUDIT_TARGET, audit_level(verbose));
    }
    let (targets, unknown) = trace_targets(&patterns);
    for t in targets {
        builder.filter_module(t, LevelFilter::Trace);
    }
    for u in unknown {
        warnings.push(format!("trace pattern '{u}' matches no event"));
    }
    // RUST_LOG, when set, has the last word.
    if let Ok(env) = std::env::var("RUST_LOG") {
        builder.parse_filters(&env);
    }
    if let Some(path) = log_file {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open trace file {path}: {e}"))?;
        builder.target(env_logger::Target::Pipe(Box::new(f)));
    }
    if stderr_is_journal() {
        // The journal adds its own timestamps; prefix the syslog priority.
        builder.format(|buf, record| {
            let prio = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{prio}>{}", record.args())
        });
    }
    builder.try_init().map_err(|e| e.to_string())?;
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_spec_forms() {
        assert_eq!(parse_trace("pr_*").unwrap().patterns, vec!["pr_*"]);
        let t = parse_trace("enable=pr_manager_run,file=/tmp/x").unwrap();
        assert_eq!(t.patterns, vec!["pr_manager_run"]);
        assert_eq!(t.file.as_deref(), Some("/tmp/x"));
        assert_eq!(
            parse_trace("events=/e").unwrap().events_file.as_deref(),
            Some("/e")
        );
        assert!(parse_trace("bogus=1").is_err());
    }

    #[test]
    fn patterns_map_to_targets() {
        let (t, u) = trace_targets(&["pr_manager_*".into(), "qio_*".into()]);
        assert_eq!(t, vec![REQUEST_TARGET, RESULT_TARGET]);
        assert_eq!(u, vec!["qio_*"]);
        assert!(glob_match("*", "anything"));
        assert!(glob_match("pr_?elper*", "pr_helper_request"));
        assert!(!glob_match("pr_helper", "pr_helper_request"));
    }

    #[test]
    fn levels() {
        assert_eq!(level(0, false), LevelFilter::Warn);
        assert_eq!(level(2, false), LevelFilter::Debug);
        assert_eq!(level(3, true), LevelFilter::Error);
        assert_eq!(audit_level(0), LevelFilter::Info);
        assert_eq!(audit_level(3), LevelFilter::Trace);
    }
}
