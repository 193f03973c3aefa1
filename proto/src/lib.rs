//! reservd's pure core: everything that is bytes in, bytes (or a decision)
//! out. No I/O, no system calls, no `unsafe`; every module is tested with
//! byte vectors.
//!
//! - [`wire`]: QEMU's pr-helper protocol (handshake, request framing,
//!   response encoding);
//! - [`cdb`], [`params`], [`prin`]: PERSISTENT RESERVE IN/OUT CDBs, PR OUT
//!   parameter lists and TransportIDs, PR IN data;
//! - [`sense`]: status, sense data, the [`sense::Answer`] to a command, and
//!   the one map from failures below SCSI to answers;
//! - [`sg`]: Linux's SG_IO interface (request numbers, `struct sg_io_hdr`);
//! - [`mpath`]: libmpathpersist's return codes and their answers;
//! - [`mpath_xlate`]: SPC-4 bytes to and from libmpathpersist's structures;
//! - [`onenexus`]: how a PR OUT on a multipath map runs so that the map
//!   answers as one I_T nexus;
//! - [`mpconf`]: the `reservation_key` settings of multipath.conf.
#![forbid(unsafe_code)]

pub mod cdb;
pub mod mpath;
pub mod mpath_xlate;
pub mod mpconf;
pub mod onenexus;
pub mod params;
pub mod prin;
pub mod sense;
pub mod sg;
pub mod wire;
