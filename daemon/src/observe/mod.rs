//! What reservd tells: its log ([`logging`]: levels, trace patterns, the
//! journal's format), and the audit trail of every PERSISTENT RESERVE OUT
//! ([`audit`]).

pub mod audit;
pub mod logging;
