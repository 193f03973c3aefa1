//! Which clients reservd serves: `--allow-uid` and `--allow-gid`, checked
//! against each client's SO_PEERCRED credentials when it connects.
//!
//! A client passes when its uid or its gid is in the lists. uid 0 always
//! passes: root can reach the devices and the socket without reservd
//! anyway, and refusing it would only break root-run tools. A client whose
//! credentials can't be read is refused. Refusals are logged at warning
//! level, at most [`LOG_BURST`] a minute; the rest are counted and the
//! count is logged with the next refusal that may be logged.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use crate::backend::Peer;

/// Refusals logged one by one in each [`LOG_WINDOW`].
pub const LOG_BURST: u32 = 10;
pub const LOG_WINDOW: Duration = Duration::from_secs(60);

/// The clients allowed to connect.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl AllowList {
    /// A list from `--allow-uid`/`--allow-gid`; None when both are empty
    /// (every client is served).
    pub fn new(uids: Vec<u32>, gids: Vec<u32>) -> Option<AllowList> {
        (!uids.is_empty() || !gids.is_empty()).then_some(AllowList { uids, gids })
    }

    /// Whether `peer` may be served.
    pub fn allows(&self, peer: Option<&Peer>) -> bool {
        match peer {
            None => false,
            Some(p) => p.uid == 0 || self.uids.contains(&p.uid) || self.gids.contains(&p.gid),
        }
    }
}

/// Limits how many refusals are logged, so a flood of connections can't
/// fill the disk.
#[derive(Debug)]
pub struct RefusalLog {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog::new()
    }
}

impl RefusalLog {
    pub fn new() -> RefusalLog {
        RefusalLog {
            window_start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// A refusal at `now`: Some(n) when it is to be logged, n being the
    /// number of refusals left unlogged before it; None when it is only
    /// counted.
    pub fn refusal(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|s| now.saturating_duration_since(s) >= LOG_WINDOW);
        if fresh {
            self.window_start = Some(now);
            self.logged = 0;
        }
        if self.logged < LOG_BURST {
            self.logged += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer { pid: 1, uid, gid }
    }

    #[test]
    fn uid_or_gid_passes_root_always_unknown_never() {
        let l = AllowList::new(vec![107], vec![36]).unwrap();
        assert!(l.allows(Some(&peer(107, 1000))));
        assert!(l.allows(Some(&peer(1000, 36))));
        assert!(l.allows(Some(&peer(0, 0))));
        assert!(!l.allows(Some(&peer(1000, 1000))));
        assert!(!l.allows(None));
        assert_eq!(AllowList::new(vec![], vec![]), None);
    }

    #[test]
    fn refusals_are_logged_in_bursts_with_the_count_left_out() {
        let mut r = RefusalLog::new();
        let t0 = Instant::now();
        for _ in 0..LOG_BURST {
            assert_eq!(r.refusal(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(r.refusal(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(r.refusal(t0 + LOG_WINDOW), Some(5));
        assert_eq!(r.refusal(t0 + LOG_WINDOW), Some(0));
    }
}
