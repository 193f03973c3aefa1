//! What reservd tells: its log ([`logging`]: levels, log targets, trace
//! patterns, the journal's format), the audit trail of every PERSISTENT
//! RESERVE OUT ([`audit`]), each command on the trace targets ([`trace`]),
//! the systemd journal ([`journal`]), and systemd's service notifications
//! ([`notify`]: readiness, status, the watchdog's keep-alives).

pub mod audit;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod trace;
