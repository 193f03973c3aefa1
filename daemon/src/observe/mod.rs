//! What reservd tells: its log ([`logging`]: levels, log targets, trace
//! patterns, the journal's format), the audit trail of every PERSISTENT
//! RESERVE OUT ([`audit`]), each command on the trace targets ([`trace`]),
//! and the systemd journal ([`journal`]).

pub mod audit;
pub mod journal;
pub mod logging;
pub mod trace;
