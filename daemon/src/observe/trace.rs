//! Tracing: each command and its outcome on the trace targets that `-T`
//! enables ([`super::logging::TRACE_EVENTS`]), around the backend that
//! serves.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use reservd_proto::sense::Answer;

use super::logging::{REQUEST_TARGET, RESULT_TARGET};
use crate::backend::{BackendError, Command, Nexus, PrBackend};

/// A backend that logs each command and its outcome on the trace targets,
/// then hands it to the real backend.
pub struct Traced(pub Arc<dyn PrBackend>);

impl PrBackend for Traced {
    fn execute(&self, cmd: &Command<'_>) -> Result<Answer, BackendError> {
        log::trace!(
            target: REQUEST_TARGET,
            "pr_helper_request conn={} fd={} cmd={:#04x} service_action={:#04x} params={}",
            cmd.nexus,
            cmd.fd.as_raw_fd(),
            cmd.cdb[0],
            cmd.cdb[1] & 0x1f,
            cmd.params.len()
        );
        let r = self.0.execute(cmd);
        if log::log_enabled!(target: RESULT_TARGET, log::Level::Trace) {
            match &r {
                Ok(a) => {
                    let sense = match a.sense_code() {
                        Some(c) => format!(" sense={:02x}/{:02x}/{:02x}", c.key, c.asc, c.ascq),
                        None => String::new(),
                    };
                    log::trace!(
                        target: RESULT_TARGET,
                        "pr_helper_result conn={} status={:#04x}{sense} data={}",
                        cmd.nexus,
                        a.status.0,
                        a.data.len()
                    );
                }
                Err(e) => log::trace!(
                    target: RESULT_TARGET,
                    "pr_helper_result conn={} error: {e}",
                    cmd.nexus
                ),
            }
        }
        r
    }

    fn disconnect(&self, nexus: Nexus) {
        self.0.disconnect(nexus)
    }
}
