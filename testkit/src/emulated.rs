//! In-memory SPC-4 persistent reservation target.
//!
//! [`Emulated`] keeps the persistent reservation state of every logical unit
//! it is shown and answers PERSISTENT RESERVE IN and OUT as an SPC-4 device
//! server does. reservd's protocol tests use it as their oracle.
//!
//! # Model
//!
//! - **Logical unit**: the device behind the command's fd. Block and
//!   character devices are told apart by `st_rdev`, other files by
//!   `(st_dev, st_ino)`, so a temporary file serves as a disk.
//! - **I_T nexus**: [`Command::nexus`], one per client connection. There is
//!   one target port, relative target port identifier [`TARGET_PORT`]. The
//!   initiator port of nexus `n` is the iSCSI initiator device
//!   `iqn.2026-11.org.reservd:nexus-<n>` ([`Emulated::initiator_transport_id`]);
//!   a nexus becomes a known initiator, which SPEC_I_PT and REGISTER AND MOVE
//!   can name, when it sends its first command.
//! - Registrations survive the end of a connection (as they survive an I_T
//!   nexus loss); the connection's pending unit attentions do not.
//! - Persist-through-power-loss is only remembered (PTPL_A): nothing is
//!   written anywhere.
//! - REGISTER AND MOVE is supported (to relative target port 1 only); with
//!   no reservation to move it is INVALID FIELD IN CDB, as in LIO.
//! - PREEMPT AND ABORT is PREEMPT: no task is ever pending to be aborted.
//!
//! # Order of checks
//!
//! As in LIO, a PERSISTENT RESERVE OUT is checked in this order:
//! 1. the CDB's PARAMETER LIST LENGTH (bytes 5..8, 32 bits) against the data
//!    received (reservd's clients send the BE16 of bytes 7..8): more declared
//!    than received is INVALID FIELD IN CDB, LIO's answer to a control CDB
//!    whose data is shorter than the CDB says; only the declared bytes count;
//! 2. a pending unit attention of the nexus is reported (and the command not
//!    run);
//! 3. an existing persistent reservation held by another nexus conflicts
//!    with every service action except REGISTER and REGISTER AND IGNORE
//!    EXISTING KEY from an unregistered nexus, and with RESERVE and REGISTER
//!    AND MOVE from a registered one unless the reservation is a
//!    registrants-only or all-registrants type (SPC-4's table of commands
//!    allowed in the presence of persistent reservations, as LIO applies it);
//! 4. the parameter list: shorter than 24 bytes is PARAMETER LIST LENGTH
//!    ERROR, SPEC_I_PT with a service action other than REGISTER is INVALID
//!    FIELD IN PARAMETER LIST, then [`ProutParams::parse`], whose
//!    TransportIDs are those of reservd's one TransportID parser
//!    ([`TransportId::parse`], the one the multipath translation uses);
//! 5. the service action itself; undefined ones (including REPLACE LOST
//!    RESERVATION) are INVALID FIELD IN CDB.
//!
//! A PERSISTENT RESERVE IN reports a pending unit attention first; then an
//! undefined service action is INVALID FIELD IN CDB. PR IN answers carry the
//! full parameter data: reservd's server cuts it to the allocation length.
//!
//! # Unit attentions
//!
//! Established per nexus and logical unit. The next PR IN or PR OUT from
//! that nexus to that logical unit gets CHECK CONDITION with the oldest one
//! pending and is not run, and every pending one is cleared: LIO's behaviour
//! with its default UA_INTLCK_CTRL of 00b (every command but INQUIRY, REPORT
//! LUNS and REQUEST SENSE reports them, PERSISTENT RESERVE IN included). As
//! only the oldest can ever be seen, only the oldest is kept.
//!
//! # Where this target differs from LIO
//!
//! It follows SPC-4 where LIO does not, so a comparison with LIO expects:
//! - the PRGENERATION is incremented once by every successful REGISTER,
//!   REGISTER AND IGNORE EXISTING KEY (including unregistering, and the
//!   no-op register of key 0 by an unregistered nexus), CLEAR, PREEMPT,
//!   PREEMPT AND ABORT and REGISTER AND MOVE; LIO does not increment it when
//!   a nexus unregisters or registers nothing, and increments it once per
//!   registration made by a SPEC_I_PT register;
//! - RELEASE by the holder with a different type is CHECK CONDITION, ILLEGAL
//!   REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION (05/26/04); LIO
//!   answers RESERVATION CONFLICT;
//! - every service action checks the RESERVATION KEY first: LIO's RELEASE
//!   with a wrong key is GOOD when there is no reservation or the nexus
//!   does not hold it;
//! - RESERVE, RELEASE, CLEAR and REGISTER AND MOVE from an unregistered nexus
//!   with no reservation present are RESERVATION CONFLICT; LIO answers
//!   LOGICAL UNIT COMMUNICATION FAILURE (0B/08/00);
//! - a SCOPE other than LU_SCOPE is INVALID FIELD IN CDB; LIO answers INVALID
//!   FIELD IN PARAMETER LIST to RESERVE and PREEMPT, and takes it for a
//!   mismatch in RELEASE;
//! - a SPEC_I_PT parameter list too short for the TRANSPORTID PARAMETER
//!   DATA LENGTH field (24 to 27 bytes) is PARAMETER LIST LENGTH ERROR, as
//!   in QEMU's multipath translation; LIO answers INVALID FIELD IN PARAMETER
//!   LIST;
//! - a SPEC_I_PT TransportID naming the sending nexus, a nexus already
//!   registered, or the same initiator twice is INVALID FIELD IN PARAMETER
//!   LIST and registers nothing; LIO skips already registered ones and
//!   registers the others;
//! - PREEMPT of an all-registrants reservation with a non-zero SERVICE ACTION
//!   RESERVATION KEY only removes the registrations holding that key (the
//!   caller's too, if it holds it); LIO treats a key equal to that of the
//!   registrant that reserved as a preemption of the reservation, and never
//!   removes the caller;
//! - a registered nexus that re-registers without ALL_TG_PT keeps its
//!   registration's ALL_TG_PT; LIO answers INVALID FIELD IN CDB;
//! - TransportIDs have the bounds libmpathpersist needs (reservd's one
//!   parser): more than 32 in a list, an iSCSI ADDITIONAL LENGTH above 252
//!   or not a multiple of 4, or an iSCSI name without a NUL within that
//!   length are INVALID FIELD IN PARAMETER LIST; LIO sets none of these
//!   limits (it reads an iSCSI name up to its NUL);
//! - allocation lengths below 8 (6 for REPORT CAPABILITIES) are not errors,
//!   and READ FULL STATUS reports every descriptor in its ADDITIONAL LENGTH;
//!   LIO answers INVALID FIELD IN CDB, and counts only the descriptors that
//!   fit.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::{Mutex, MutexGuard};

use reservd_daemon::backend::{BackendError, Command, Nexus, PrBackend};
use reservd_proto::cdb::{
    pr_type, prin_sa, prout_sa, PrOutCdb, PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT,
};
use reservd_proto::params::{ProutParams, TransportId, BASIC_PARAMS_LEN, FLAG_SPEC_I_PT};
use reservd_proto::prin::{self, Capabilities, FullStatusDescriptor};
use reservd_proto::sense::{Answer, SenseCode, Status};
use reservd_proto::wire::OP_CLEANUP;

/// Relative target port identifier of the one target port.
pub const TARGET_PORT: u16 = 1;

/// Initiator port names are this prefix followed by the nexus number.
pub const INITIATOR_NAME_PREFIX: &str = "iqn.2026-11.org.reservd:nexus-";

/// Registrations one logical unit holds unless told otherwise.
pub const DEFAULT_MAX_REGISTRATIONS: usize = 1024;

const LU_SCOPE: u8 = 0;

/// Which logical unit a file descriptor reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LuId {
    /// A block or character device, by device number.
    Device(u64),
    /// Any other file, by device and inode.
    File { dev: u64, ino: u64 },
}

impl LuId {
    // The stat field types differ between architectures.
    #[allow(clippy::unnecessary_cast)]
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<LuId> {
        let st = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
        let format = st.st_mode & libc::S_IFMT;
        Ok(if format == libc::S_IFBLK || format == libc::S_IFCHR {
            LuId::Device(st.st_rdev as u64)
        } else {
            LuId::File {
                dev: st.st_dev as u64,
                ino: st.st_ino as u64,
            }
        })
    }
}

fn registrants_only(t: u8) -> bool {
    matches!(
        t,
        pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY | pr_type::EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
    )
}

fn all_types_mask() -> u16 {
    [1u8, 3, 5, 6, 7, 8]
        .iter()
        .fold(0, |m, &t| m | prin::type_mask_bit(t))
}

#[derive(Clone, Debug)]
struct Registration {
    nexus: Nexus,
    key: u64,
    all_tg_pt: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    Nexus(Nexus),
    /// All-registrants types: every registered nexus holds the reservation.
    AllRegistrants,
}

/// The persistent reservation of a logical unit (its scope is LU_SCOPE).
#[derive(Clone, Copy, Debug)]
struct Reservation {
    holder: Holder,
    pr_type: u8,
}

impl Reservation {
    fn new(nexus: Nexus, pr_type: u8) -> Reservation {
        let holder = if pr_type::is_all_registrants(pr_type) {
            Holder::AllRegistrants
        } else {
            Holder::Nexus(nexus)
        };
        Reservation { holder, pr_type }
    }
}

/// What a service action needs to know beyond its logical unit.
struct Ctx<'a> {
    initiators: &'a HashSet<Nexus>,
    max_registrations: usize,
}

impl Ctx<'_> {
    /// The known nexus a TransportID names.
    fn initiator(&self, tid: &TransportId) -> Option<Nexus> {
        Emulated::initiator_nexus(tid).filter(|n| self.initiators.contains(n))
    }
}

/// Why a service action was refused; `Ok(())` is GOOD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    Conflict,
    Check(SenseCode),
}

fn conflict() -> Answer {
    Answer::status(Status::RESERVATION_CONFLICT)
}

fn check(code: SenseCode) -> Answer {
    Answer::check(code)
}

/// The persistent reservation state of one logical unit.
#[derive(Default)]
struct Lu {
    generation: u32,
    /// In the order the registrations were made.
    registrations: Vec<Registration>,
    /// Invariant: a `Holder::Nexus` is registered, and an all-registrants
    /// reservation has at least one registrant.
    reservation: Option<Reservation>,
    ptpl_active: bool,
    /// The oldest pending unit attention of each nexus.
    unit_attentions: HashMap<Nexus, SenseCode>,
}

impl Lu {
    fn registration(&self, nexus: Nexus) -> Option<&Registration> {
        self.registrations.iter().find(|r| r.nexus == nexus)
    }

    fn key_of(&self, nexus: Nexus) -> Option<u64> {
        self.registration(nexus).map(|r| r.key)
    }

    fn is_holder(&self, nexus: Nexus) -> bool {
        match self.reservation {
            Some(Reservation {
                holder: Holder::Nexus(h),
                ..
            }) => h == nexus,
            Some(Reservation {
                holder: Holder::AllRegistrants,
                ..
            }) => self.registration(nexus).is_some(),
            None => false,
        }
    }

    fn bump_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    fn queue_unit_attention(&mut self, nexus: Nexus, code: SenseCode) {
        self.unit_attentions.entry(nexus).or_insert(code);
    }

    fn unit_attention_to_registrants(&mut self, except: Nexus, code: SenseCode) {
        let to: Vec<Nexus> = self
            .registrations
            .iter()
            .map(|r| r.nexus)
            .filter(|&n| n != except)
            .collect();
        for n in to {
            self.queue_unit_attention(n, code);
        }
    }

    /// The oldest pending unit attention of `nexus`; clears them all.
    fn take_unit_attention(&mut self, nexus: Nexus) -> Option<SenseCode> {
        self.unit_attentions.remove(&nexus)
    }

    /// Remove the registrations `which` selects; returns their nexuses.
    fn remove_registrations(&mut self, which: impl Fn(&Registration) -> bool) -> Vec<Nexus> {
        let mut removed = Vec::new();
        self.registrations.retain(|r| {
            let hit = which(r);
            if hit {
                removed.push(r.nexus);
            }
            !hit
        });
        removed
    }

    /// The nexus must be registered with `key`.
    fn check_key(&self, nexus: Nexus, key: u64) -> Result<(), Refusal> {
        match self.key_of(nexus) {
            Some(k) if k == key => Ok(()),
            _ => Err(Refusal::Conflict),
        }
    }

    // ---- PERSISTENT RESERVE IN ----

    fn pr_in(&mut self, nexus: Nexus, cdb: &[u8; 16]) -> Answer {
        if let Some(ua) = self.take_unit_attention(nexus) {
            return check(ua);
        }
        let data = match cdb[1] & 0x1f {
            prin_sa::READ_KEYS => {
                let keys: Vec<u64> = self.registrations.iter().map(|r| r.key).collect();
                prin::read_keys(self.generation, &keys)
            }
            prin_sa::READ_RESERVATION => {
                let r = self.reservation.map(|r| prin::Reservation {
                    // SPC-4: the key of an all-registrants reservation is 0.
                    key: match r.holder {
                        Holder::Nexus(h) => self.key_of(h).unwrap_or(0),
                        Holder::AllRegistrants => 0,
                    },
                    scope: LU_SCOPE,
                    pr_type: r.pr_type,
                });
                prin::read_reservation(self.generation, r)
            }
            prin_sa::REPORT_CAPABILITIES => prin::report_capabilities(&Capabilities {
                rlr_c: false,
                crh: true,
                sip_c: true,
                atp_c: true,
                ptpl_c: true,
                tmv: true,
                allow_commands: 1,
                ptpl_a: self.ptpl_active,
                type_mask: all_types_mask(),
            }),
            prin_sa::READ_FULL_STATUS => {
                let descs: Vec<FullStatusDescriptor> = self
                    .registrations
                    .iter()
                    .map(|r| {
                        let holder = self.is_holder(r.nexus);
                        FullStatusDescriptor {
                            key: r.key,
                            all_tg_pt: r.all_tg_pt,
                            reservation_holder: holder,
                            scope: LU_SCOPE,
                            pr_type: match self.reservation {
                                Some(res) if holder => res.pr_type,
                                _ => 0,
                            },
                            // Not defined with ALL_TG_PT; LIO leaves it 0.
                            relative_target_port: if r.all_tg_pt { 0 } else { TARGET_PORT },
                            transport_id: Emulated::initiator_transport_id(r.nexus).encode(),
                        }
                    })
                    .collect();
                prin::read_full_status(self.generation, &descs)
            }
            _ => return check(SenseCode::INVALID_FIELD),
        };
        Answer::good(data)
    }

    // ---- PERSISTENT RESERVE OUT ----

    fn pr_out(&mut self, nexus: Nexus, cdb: &[u8; 16], data: &[u8], ctx: &Ctx<'_>) -> Answer {
        let c = match PrOutCdb::parse(cdb) {
            Ok(c) => c,
            Err(code) => return check(code),
        };
        let declared = c.parameter_list_length as usize;
        if declared > data.len() {
            return check(SenseCode::INVALID_FIELD);
        }
        let data = &data[..declared];
        if let Some(ua) = self.take_unit_attention(nexus) {
            return check(ua);
        }
        let sa = c.service_action;
        if self.conflicts_with_reservation(nexus, sa) {
            return conflict();
        }
        if data.len() < BASIC_PARAMS_LEN {
            return check(SenseCode::INVALID_PARAM_LEN);
        }
        if sa != prout_sa::REGISTER
            && sa != prout_sa::REGISTER_AND_MOVE
            && data[20] & FLAG_SPEC_I_PT != 0
        {
            return check(SenseCode::INVALID_PARAM);
        }
        let p = match ProutParams::parse(sa, data) {
            Ok(p) => p,
            Err(code) => return check(code),
        };
        let outcome = match sa {
            prout_sa::REGISTER => self.register(nexus, &p, false, ctx),
            prout_sa::REGISTER_AND_IGNORE => self.register(nexus, &p, true, ctx),
            prout_sa::RESERVE => self.reserve(nexus, &c, &p),
            prout_sa::RELEASE => self.release(nexus, &c, &p),
            prout_sa::CLEAR => self.clear(nexus, &p),
            prout_sa::PREEMPT | prout_sa::PREEMPT_AND_ABORT => self.preempt(nexus, &c, &p),
            prout_sa::REGISTER_AND_MOVE => self.register_and_move(nexus, &p, ctx),
            _ => Err(Refusal::Check(SenseCode::INVALID_FIELD)),
        };
        match outcome {
            Ok(()) => Answer::status(Status::GOOD),
            Err(Refusal::Conflict) => conflict(),
            Err(Refusal::Check(code)) => check(code),
        }
    }

    /// Whether an existing reservation held by another nexus refuses this
    /// service action from `nexus` before it is looked at.
    fn conflicts_with_reservation(&self, nexus: Nexus, sa: u8) -> bool {
        let Some(r) = self.reservation else {
            return false;
        };
        if self.is_holder(nexus) {
            return false;
        }
        let registered = self.registration(nexus).is_some();
        match sa {
            prout_sa::REGISTER | prout_sa::REGISTER_AND_IGNORE => false,
            _ if !registered => true,
            prout_sa::RELEASE
            | prout_sa::CLEAR
            | prout_sa::PREEMPT
            | prout_sa::PREEMPT_AND_ABORT => false,
            prout_sa::RESERVE | prout_sa::REGISTER_AND_MOVE => {
                !(registrants_only(r.pr_type) || pr_type::is_all_registrants(r.pr_type))
            }
            _ => true,
        }
    }

    fn register(
        &mut self,
        nexus: Nexus,
        p: &ProutParams,
        ignore_key: bool,
        ctx: &Ctx<'_>,
    ) -> Result<(), Refusal> {
        match self.key_of(nexus) {
            None => {
                if !ignore_key && p.key != 0 {
                    return Err(Refusal::Conflict);
                }
                if p.sa_key != 0 {
                    // The sending nexus, then every initiator SPEC_I_PT names.
                    let mut new = vec![nexus];
                    for tid in &p.transport_ids {
                        let n = ctx
                            .initiator(tid)
                            .ok_or(Refusal::Check(SenseCode::INVALID_PARAM))?;
                        if new.contains(&n) || self.registration(n).is_some() {
                            return Err(Refusal::Check(SenseCode::INVALID_PARAM));
                        }
                        new.push(n);
                    }
                    if self.registrations.len() + new.len() > ctx.max_registrations {
                        return Err(Refusal::Check(
                            SenseCode::INSUFFICIENT_REGISTRATION_RESOURCES,
                        ));
                    }
                    self.registrations
                        .extend(new.into_iter().map(|n| Registration {
                            nexus: n,
                            key: p.sa_key,
                            all_tg_pt: p.all_tg_pt,
                        }));
                    self.ptpl_active = p.aptpl;
                }
            }
            Some(key) => {
                if !ignore_key && p.key != key {
                    return Err(Refusal::Conflict);
                }
                if p.spec_i_pt {
                    return Err(Refusal::Check(SenseCode::INVALID_PARAM));
                }
                if p.sa_key != 0 {
                    if let Some(r) = self.registrations.iter_mut().find(|r| r.nexus == nexus) {
                        r.key = p.sa_key;
                    }
                } else {
                    self.unregister(nexus);
                }
                self.ptpl_active = p.aptpl;
            }
        }
        self.bump_generation();
        Ok(())
    }

    /// Remove the registration of `nexus` and release what it held.
    fn unregister(&mut self, nexus: Nexus) {
        self.registrations.retain(|r| r.nexus != nexus);
        match self.reservation {
            Some(Reservation {
                holder: Holder::Nexus(h),
                pr_type,
            }) if h == nexus => {
                self.reservation = None;
                if registrants_only(pr_type) {
                    self.unit_attention_to_registrants(nexus, SenseCode::RESERVATIONS_RELEASED);
                }
            }
            Some(Reservation {
                holder: Holder::AllRegistrants,
                ..
            }) if self.registrations.is_empty() => self.reservation = None,
            _ => {}
        }
    }

    fn reserve(&mut self, nexus: Nexus, c: &PrOutCdb, p: &ProutParams) -> Result<(), Refusal> {
        if !pr_type::is_valid(c.pr_type) {
            return Err(Refusal::Check(SenseCode::INVALID_FIELD));
        }
        self.check_key(nexus, p.key)?;
        if c.scope != LU_SCOPE {
            return Err(Refusal::Check(SenseCode::INVALID_FIELD));
        }
        match self.reservation {
            // Reserving again what one holds is GOOD; anything else conflicts.
            Some(r) if self.is_holder(nexus) && r.pr_type == c.pr_type => Ok(()),
            Some(_) => Err(Refusal::Conflict),
            None => {
                self.reservation = Some(Reservation::new(nexus, c.pr_type));
                Ok(())
            }
        }
    }

    fn release(&mut self, nexus: Nexus, c: &PrOutCdb, p: &ProutParams) -> Result<(), Refusal> {
        self.check_key(nexus, p.key)?;
        if c.scope != LU_SCOPE {
            return Err(Refusal::Check(SenseCode::INVALID_FIELD));
        }
        // No reservation, or not its holder: nothing happens, GOOD.
        let Some(r) = self.reservation.filter(|_| self.is_holder(nexus)) else {
            return Ok(());
        };
        if r.pr_type != c.pr_type {
            return Err(Refusal::Check(SenseCode::INVALID_RELEASE));
        }
        self.reservation = None;
        if registrants_only(r.pr_type) || pr_type::is_all_registrants(r.pr_type) {
            self.unit_attention_to_registrants(nexus, SenseCode::RESERVATIONS_RELEASED);
        }
        Ok(())
    }

    fn clear(&mut self, nexus: Nexus, p: &ProutParams) -> Result<(), Refusal> {
        self.check_key(nexus, p.key)?;
        self.unit_attention_to_registrants(nexus, SenseCode::RESERVATIONS_PREEMPTED);
        self.registrations.clear();
        self.reservation = None;
        // Nothing is left to persist.
        self.ptpl_active = false;
        self.bump_generation();
        Ok(())
    }

    /// PREEMPT and PREEMPT AND ABORT (no task is ever pending, so there is
    /// nothing to abort).
    fn preempt(&mut self, nexus: Nexus, c: &PrOutCdb, p: &ProutParams) -> Result<(), Refusal> {
        if !pr_type::is_valid(c.pr_type) {
            return Err(Refusal::Check(SenseCode::INVALID_FIELD));
        }
        self.check_key(nexus, p.key)?;
        if c.scope != LU_SCOPE {
            return Err(Refusal::Check(SenseCode::INVALID_FIELD));
        }
        let sa_key = p.sa_key;
        match self.reservation {
            Some(Reservation {
                holder: Holder::AllRegistrants,
                ..
            }) if sa_key == 0 => {
                // Preempt an all-registrants reservation: everyone else goes.
                let removed = self.remove_registrations(|r| r.nexus != nexus);
                for n in removed {
                    self.queue_unit_attention(n, SenseCode::REGISTRATIONS_PREEMPTED);
                }
                self.reservation = Some(Reservation::new(nexus, c.pr_type));
            }
            Some(Reservation {
                holder: Holder::Nexus(h),
                pr_type: old_type,
            }) if self.key_of(h) == Some(sa_key) => {
                // Preempt the holder's reservation (possibly one's own).
                let removed = self.remove_registrations(|r| r.key == sa_key && r.nexus != nexus);
                for n in removed {
                    self.queue_unit_attention(n, SenseCode::REGISTRATIONS_PREEMPTED);
                }
                self.reservation = Some(Reservation::new(nexus, c.pr_type));
                if old_type != c.pr_type {
                    self.unit_attention_to_registrants(nexus, SenseCode::RESERVATIONS_RELEASED);
                }
            }
            _ => {
                // Remove registrations; the reservation, if any, stays.
                if sa_key == 0 {
                    return Err(Refusal::Check(SenseCode::INVALID_PARAM));
                }
                let removed = self.remove_registrations(|r| r.key == sa_key);
                if removed.is_empty() {
                    return Err(Refusal::Conflict);
                }
                for n in removed.into_iter().filter(|&n| n != nexus) {
                    self.queue_unit_attention(n, SenseCode::REGISTRATIONS_PREEMPTED);
                }
                if matches!(
                    self.reservation,
                    Some(Reservation {
                        holder: Holder::AllRegistrants,
                        ..
                    })
                ) && self.registrations.is_empty()
                {
                    self.reservation = None;
                }
            }
        }
        self.bump_generation();
        Ok(())
    }

    fn register_and_move(
        &mut self,
        nexus: Nexus,
        p: &ProutParams,
        ctx: &Ctx<'_>,
    ) -> Result<(), Refusal> {
        self.check_key(nexus, p.key)?;
        if p.sa_key == 0 || p.relative_target_port != TARGET_PORT {
            return Err(Refusal::Check(SenseCode::INVALID_PARAM));
        }
        let dest = p
            .transport_ids
            .first()
            .and_then(|tid| ctx.initiator(tid))
            .filter(|&d| d != nexus)
            .ok_or(Refusal::Check(SenseCode::INVALID_PARAM))?;
        let Some(r) = self.reservation else {
            return Err(Refusal::Check(SenseCode::INVALID_FIELD));
        };
        if !self.is_holder(nexus) || r.holder == Holder::AllRegistrants {
            return Err(Refusal::Conflict);
        }
        match self.registrations.iter_mut().find(|x| x.nexus == dest) {
            Some(d) => d.key = p.sa_key,
            None => {
                if self.registrations.len() >= ctx.max_registrations {
                    return Err(Refusal::Check(
                        SenseCode::INSUFFICIENT_REGISTRATION_RESOURCES,
                    ));
                }
                self.registrations.push(Registration {
                    nexus: dest,
                    key: p.sa_key,
                    all_tg_pt: false,
                });
            }
        }
        self.reservation = Some(Reservation {
            holder: Holder::Nexus(dest),
            pr_type: r.pr_type,
        });
        if p.unreg {
            self.registrations.retain(|x| x.nexus != nexus);
        }
        self.ptpl_active = p.aptpl;
        self.bump_generation();
        Ok(())
    }
}

#[derive(Default)]
struct State {
    luns: HashMap<LuId, Lu>,
    /// Every nexus that has sent a command.
    initiators: HashSet<Nexus>,
}

/// The in-memory SPC-4 target. Cheap to share: one lock around everything.
pub struct Emulated {
    state: Mutex<State>,
    max_registrations: usize,
}

impl Default for Emulated {
    fn default() -> Self {
        Emulated::new()
    }
}

impl Emulated {
    pub fn new() -> Emulated {
        Emulated::with_max_registrations(DEFAULT_MAX_REGISTRATIONS)
    }

    /// A target whose logical units hold at most `max` registrations each;
    /// more is INSUFFICIENT REGISTRATION RESOURCES.
    pub fn with_max_registrations(max: usize) -> Emulated {
        Emulated {
            state: Mutex::new(State::default()),
            max_registrations: max,
        }
    }

    /// The TransportID of the initiator port of `nexus`.
    pub fn initiator_transport_id(nexus: Nexus) -> TransportId {
        TransportId::Iscsi {
            format: 0,
            name: format!("{INITIATOR_NAME_PREFIX}{nexus}").into_bytes(),
        }
    }

    /// The nexus whose initiator port `tid` names (format 01 iSCSI
    /// TransportIDs name it too, whatever their ISID), known or not.
    pub fn initiator_nexus(tid: &TransportId) -> Option<Nexus> {
        let TransportId::Iscsi { format, name } = tid else {
            return None;
        };
        let name = std::str::from_utf8(name).ok()?;
        let name = if *format == 1 {
            name.split_once(",i,0x")?.0
        } else {
            name
        };
        let digits = name.strip_prefix(INITIATOR_NAME_PREFIX)?;
        let n: Nexus = digits.parse().ok()?;
        (n.to_string() == digits).then_some(n)
    }

    /// Every nexus that has sent a command, in increasing order.
    pub fn initiators(&self) -> Vec<Nexus> {
        let mut v: Vec<Nexus> = self.lock().initiators.iter().copied().collect();
        v.sort_unstable();
        v
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PrBackend for Emulated {
    fn execute(&self, cmd: &Command<'_>) -> Result<Answer, BackendError> {
        let id = LuId::of(cmd.fd).map_err(BackendError::BadFd)?;
        let mut guard = self.lock();
        let state = &mut *guard;
        state.initiators.insert(cmd.nexus);
        let ctx = Ctx {
            initiators: &state.initiators,
            max_registrations: self.max_registrations,
        };
        let lu = state.luns.entry(id).or_default();
        Ok(match cmd.cdb[0] {
            PERSISTENT_RESERVE_IN => lu.pr_in(cmd.nexus, cmd.cdb),
            PERSISTENT_RESERVE_OUT => lu.pr_out(cmd.nexus, cmd.cdb, cmd.params, &ctx),
            // CLEANUP has nothing to undo on a device that is not multipath.
            OP_CLEANUP => Answer::status(Status::GOOD),
            _ => check(SenseCode::INVALID_OPCODE),
        })
    }

    fn disconnect(&self, nexus: Nexus) {
        for lu in self.lock().luns.values_mut() {
            lu.unit_attentions.remove(&nexus);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disks::Disk;
    use reservd_proto::params::{FLAG_ALL_TG_PT, FLAG_APTPL};
    use reservd_proto::prin::{
        parse_read_full_status, parse_read_keys, parse_read_reservation, parse_report_capabilities,
    };
    use reservd_proto::wire::{encode_response, Request, RESPONSE_HEADER_SIZE};
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::sync::Arc;

    const WE: u8 = pr_type::WRITE_EXCLUSIVE;
    const EA: u8 = pr_type::EXCLUSIVE_ACCESS;
    const WE_RO: u8 = pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY;
    const EA_RO: u8 = pr_type::EXCLUSIVE_ACCESS_REGISTRANTS_ONLY;
    const WE_AR: u8 = pr_type::WRITE_EXCLUSIVE_ALL_REGISTRANTS;
    const EA_AR: u8 = pr_type::EXCLUSIVE_ACCESS_ALL_REGISTRANTS;
    const TYPES: [u8; 6] = [WE, EA, WE_RO, EA_RO, WE_AR, EA_AR];

    use prout_sa::{
        CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER, REGISTER_AND_IGNORE, REGISTER_AND_MOVE,
        RELEASE, RESERVE,
    };

    fn cdb_in(sa: u8) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = PERSISTENT_RESERVE_IN;
        c[1] = sa;
        c[7..9].copy_from_slice(&8192u16.to_be_bytes());
        c
    }

    fn cdb_out(sa: u8, scope_type: u8, len: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = PERSISTENT_RESERVE_OUT;
        c[1] = sa;
        c[2] = scope_type;
        c[5..9].copy_from_slice(&len.to_be_bytes());
        c
    }

    fn basic(key: u64, sa_key: u64, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p[20] = flags;
        p
    }

    fn spec_i_pt(key: u64, sa_key: u64, tids: &[TransportId]) -> Vec<u8> {
        ProutParams {
            key,
            sa_key,
            spec_i_pt: true,
            transport_ids: tids.to_vec(),
            ..Default::default()
        }
        .encode()
    }

    fn move_params(key: u64, sa_key: u64, unreg: bool, rtpi: u16, tid: &TransportId) -> Vec<u8> {
        let t = tid.encode();
        let mut p = basic(key, sa_key, 0);
        p[17] = if unreg { 0x02 } else { 0 };
        p[18..20].copy_from_slice(&rtpi.to_be_bytes());
        p[20..24].copy_from_slice(&(t.len() as u32).to_be_bytes());
        p.extend_from_slice(&t);
        p
    }

    fn tid(n: Nexus) -> TransportId {
        Emulated::initiator_transport_id(n)
    }

    #[track_caller]
    fn assert_good(a: Answer) {
        assert_eq!(a.status, Status::GOOD, "{a:?}");
    }

    #[track_caller]
    fn assert_conflict(a: Answer) {
        assert_eq!(a.status, Status::RESERVATION_CONFLICT, "{a:?}");
        assert!(a.sense.iter().all(|&b| b == 0));
    }

    #[track_caller]
    fn assert_sense(a: Answer, code: SenseCode) {
        assert_eq!(a.status, Status::CHECK_CONDITION, "{a:?}");
        assert_eq!(a.sense_code(), Some(code), "{a:?}");
        assert_eq!(a.sense[..18], code.fixed());
        assert!(a.sense[18..].iter().all(|&b| b == 0));
    }

    /// One logical unit of an emulated target.
    struct Lun {
        emu: Arc<Emulated>,
        disk: Disk,
    }

    impl Lun {
        fn new() -> Lun {
            Lun::on(Arc::new(Emulated::new()))
        }

        fn on(emu: Arc<Emulated>) -> Lun {
            Lun {
                emu,
                disk: Disk::new(),
            }
        }

        fn run(&self, nexus: Nexus, cdb: [u8; 16], params: &[u8]) -> Answer {
            self.emu
                .execute(&Command {
                    nexus,
                    peer: None,
                    fd: self.disk.file.as_fd(),
                    cdb: &cdb,
                    params,
                })
                .unwrap()
        }

        fn out_raw(&self, nexus: Nexus, sa: u8, scope_type: u8, params: &[u8]) -> Answer {
            self.run(nexus, cdb_out(sa, scope_type, params.len() as u32), params)
        }

        fn out(&self, nexus: Nexus, sa: u8, t: u8, key: u64, sa_key: u64) -> Answer {
            self.out_raw(nexus, sa, t, &basic(key, sa_key, 0))
        }

        fn prin(&self, nexus: Nexus, sa: u8) -> Answer {
            self.run(nexus, cdb_in(sa), &[])
        }

        #[track_caller]
        fn data(&self, nexus: Nexus, sa: u8) -> Vec<u8> {
            let a = self.prin(nexus, sa);
            assert_eq!(a.status, Status::GOOD, "{a:?}");
            a.data
        }

        #[track_caller]
        fn keys(&self, nexus: Nexus) -> (u32, Vec<u64>) {
            let d = self.data(nexus, prin_sa::READ_KEYS);
            let (g, k, more) = parse_read_keys(&d).unwrap();
            assert!(!more);
            (g, k)
        }

        #[track_caller]
        fn generation(&self, nexus: Nexus) -> u32 {
            self.keys(nexus).0
        }

        #[track_caller]
        fn reservation(&self, nexus: Nexus) -> Option<prin::Reservation> {
            parse_read_reservation(&self.data(nexus, prin_sa::READ_RESERVATION))
                .unwrap()
                .1
        }

        #[track_caller]
        fn full_status(&self, nexus: Nexus) -> Vec<FullStatusDescriptor> {
            parse_read_full_status(&self.data(nexus, prin_sa::READ_FULL_STATUS))
                .unwrap()
                .1
        }

        #[track_caller]
        fn capabilities(&self, nexus: Nexus) -> Capabilities {
            parse_report_capabilities(&self.data(nexus, prin_sa::REPORT_CAPABILITIES)).unwrap()
        }

        /// Register `key` for `nexus` (which must be unregistered).
        #[track_caller]
        fn register(&self, nexus: Nexus, key: u64) {
            assert_good(self.out(nexus, REGISTER, 0, 0, key));
        }

        #[track_caller]
        fn reserve(&self, nexus: Nexus, key: u64, t: u8) {
            assert_good(self.out(nexus, RESERVE, t, key, 0));
        }

        /// Assert that `nexus` has no unit attention pending (uses a PR IN).
        #[track_caller]
        fn assert_no_ua(&self, nexus: Nexus) {
            assert_good(self.prin(nexus, prin_sa::READ_KEYS));
        }

        /// Assert that the next command of `nexus` reports `code`.
        #[track_caller]
        fn assert_ua(&self, nexus: Nexus, code: SenseCode) {
            assert_sense(self.prin(nexus, prin_sa::READ_KEYS), code);
        }

        #[track_caller]
        fn held_by(&self, key: u64, t: u8) {
            assert_eq!(
                self.reservation(99),
                Some(prin::Reservation {
                    key,
                    scope: 0,
                    pr_type: t
                })
            );
        }
    }

    // ---- REGISTER and REGISTER AND IGNORE EXISTING KEY ----

    #[test]
    fn register_change_key_and_unregister() {
        let l = Lun::new();
        assert_eq!(l.keys(1), (0, vec![]));
        l.register(1, 0xa);
        assert_eq!(l.keys(1), (1, vec![0xa]));
        // Registered: the RESERVATION KEY must match.
        assert_conflict(l.out(1, REGISTER, 0, 0, 0xb));
        assert_conflict(l.out(1, REGISTER, 0, 0xb, 0xb));
        assert_eq!(l.keys(1), (1, vec![0xa]));
        assert_good(l.out(1, REGISTER, 0, 0xa, 0xb));
        assert_eq!(l.keys(1), (2, vec![0xb]));
        // SERVICE ACTION RESERVATION KEY 0 unregisters.
        assert_good(l.out(1, REGISTER, 0, 0xb, 0));
        assert_eq!(l.keys(1), (3, vec![]));
    }

    #[test]
    fn register_from_unregistered_nexus() {
        let l = Lun::new();
        // A non-zero RESERVATION KEY from an unregistered nexus conflicts.
        assert_conflict(l.out(1, REGISTER, 0, 5, 6));
        assert_eq!(l.keys(1), (0, vec![]));
        // Key 0: nothing is registered, GOOD, and it counts as a REGISTER.
        assert_good(l.out(1, REGISTER, 0, 0, 0));
        assert_eq!(l.keys(1), (1, vec![]));
    }

    #[test]
    fn register_and_ignore_existing_key() {
        let l = Lun::new();
        // The RESERVATION KEY is ignored, registered or not.
        assert_good(l.out(1, REGISTER_AND_IGNORE, 0, 77, 0xa));
        assert_good(l.out(1, REGISTER_AND_IGNORE, 0, 88, 0xc));
        assert_eq!(l.keys(1), (2, vec![0xc]));
        assert_good(l.out(1, REGISTER_AND_IGNORE, 0, 99, 0));
        assert_eq!(l.keys(1), (3, vec![]));
    }

    #[test]
    fn keys_are_listed_in_registration_order_and_may_repeat() {
        let l = Lun::new();
        l.register(3, 0x30);
        l.register(1, 0x10);
        l.register(2, 0x30);
        assert_good(l.out(3, REGISTER, 0, 0x30, 0x33));
        assert_eq!(l.keys(1).1, vec![0x33, 0x10, 0x30]);
    }

    // ---- RESERVE and RELEASE ----

    #[test]
    fn reserve_and_release_each_type() {
        for t in TYPES {
            let l = Lun::new();
            l.register(1, 0xaa);
            l.register(2, 0xbb);
            l.reserve(1, 0xaa, t);
            // All-registrants reservations report key 0.
            let key = if pr_type::is_all_registrants(t) {
                0
            } else {
                0xaa
            };
            l.held_by(key, t);
            // Reserving the same again is GOOD; another type conflicts.
            l.reserve(1, 0xaa, t);
            let other = if t == WE { EA } else { WE };
            assert_conflict(l.out(1, RESERVE, other, 0xaa, 0));
            l.held_by(key, t);
            assert_good(l.out(1, RELEASE, t, 0xaa, 0));
            assert_eq!(l.reservation(1), None);
            // RESERVE and RELEASE leave the generation alone.
            assert_eq!(l.generation(1), 2, "type {t}");
        }
    }

    #[test]
    fn another_nexus_cannot_reserve() {
        for t in [WE, EA, WE_RO, EA_RO] {
            let l = Lun::new();
            l.register(1, 1);
            l.register(2, 2);
            l.reserve(1, 1, t);
            assert_conflict(l.out(2, RESERVE, t, 2, 0));
            assert_conflict(l.out(2, RESERVE, WE_AR, 2, 0));
            l.held_by(1, t);
        }
    }

    #[test]
    fn unregistered_nexus_conflicts() {
        let l = Lun::new();
        l.register(1, 1);
        // No reservation yet, then with one.
        for reserved in [false, true] {
            if reserved {
                l.reserve(1, 1, WE_RO);
            }
            for sa in [RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT] {
                assert_conflict(l.out(2, sa, WE_RO, 0, 1));
            }
            assert_conflict(l.out_raw(
                2,
                REGISTER_AND_MOVE,
                0,
                &move_params(0, 5, false, 1, &tid(1)),
            ));
        }
        assert_eq!(l.keys(1), (1, vec![1]));
        l.held_by(1, WE_RO);
    }

    #[test]
    fn a_reservation_refuses_other_nexuses_before_the_parameter_list() {
        let l = Lun::new();
        l.register(1, 1);
        l.register(2, 2);
        // Without a reservation the short list is what is wrong.
        assert_sense(l.out_raw(3, RESERVE, WE, &[]), SenseCode::INVALID_PARAM_LEN);
        l.reserve(1, 1, WE);
        // Unregistered: anything but a register service action conflicts,
        // even an undefined service action or a bad parameter list.
        for sa in [
            RESERVE,
            RELEASE,
            CLEAR,
            PREEMPT,
            REGISTER_AND_MOVE,
            0x08,
            0x1f,
        ] {
            assert_conflict(l.out_raw(3, sa, WE, &[]));
        }
        assert_sense(l.out_raw(3, REGISTER, 0, &[]), SenseCode::INVALID_PARAM_LEN);
        // Registered: RESERVE and REGISTER AND MOVE conflict under WE and EA.
        assert_conflict(l.out_raw(2, RESERVE, 0, &[]));
        assert_sense(l.out_raw(2, RELEASE, 0, &[]), SenseCode::INVALID_PARAM_LEN);
        // ... but not under registrants-only types.
        assert_good(l.out(1, RELEASE, WE, 1, 0));
        l.reserve(1, 1, EA_RO);
        assert_sense(l.out_raw(2, RESERVE, 0, &[]), SenseCode::INVALID_PARAM_LEN);
        // The holder itself is never refused here.
        assert_sense(l.out_raw(1, CLEAR, 0, &[]), SenseCode::INVALID_PARAM_LEN);
    }

    #[test]
    fn wrong_reservation_key_conflicts() {
        let l = Lun::new();
        l.register(1, 1);
        l.register(2, 2);
        assert_conflict(l.out(1, RESERVE, WE, 2, 0));
        l.reserve(1, 1, WE);
        for sa in [RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT] {
            assert_conflict(l.out(1, sa, WE, 7, 2));
        }
        // A registered non-holder's RELEASE is checked too.
        assert_conflict(l.out(2, RELEASE, WE, 7, 0));
        assert_eq!(l.keys(1), (2, vec![1, 2]));
        l.held_by(1, WE);
    }

    #[test]
    fn release_rules() {
        let l = Lun::new();
        l.register(1, 1);
        l.register(2, 2);
        // No reservation: GOOD, nothing happens.
        assert_good(l.out(1, RELEASE, WE, 1, 0));
        l.reserve(1, 1, EA_RO);
        // A registered non-holder: GOOD, the reservation stays.
        assert_good(l.out(2, RELEASE, EA_RO, 2, 0));
        l.held_by(1, EA_RO);
        // The holder with another type, or an undefined one.
        assert_sense(l.out(1, RELEASE, WE_RO, 1, 0), SenseCode::INVALID_RELEASE);
        assert_sense(l.out(1, RELEASE, 0, 1, 0), SenseCode::INVALID_RELEASE);
        // A scope other than LU_SCOPE.
        assert_sense(
            l.out(1, RELEASE, 0x10 | EA_RO, 1, 0),
            SenseCode::INVALID_FIELD,
        );
        l.held_by(1, EA_RO);
        assert_good(l.out(1, RELEASE, EA_RO, 1, 0));
        assert_eq!(l.reservation(1), None);
        assert_eq!(l.generation(1), 2);
    }

    #[test]
    fn release_unit_attentions() {
        for t in TYPES {
            let l = Lun::new();
            l.register(1, 1);
            l.register(2, 2);
            l.reserve(1, 1, t);
            // Nexus 3 is not registered and never hears of it.
            l.assert_no_ua(3);
            assert_good(l.out(1, RELEASE, t, 1, 0));
            l.assert_no_ua(1);
            l.assert_no_ua(3);
            if registrants_only(t) || pr_type::is_all_registrants(t) {
                l.assert_ua(2, SenseCode::RESERVATIONS_RELEASED);
            }
            l.assert_no_ua(2);
        }
    }

    #[test]
    fn unregistering_the_holder_releases() {
        for t in [WE, EA, WE_RO, EA_RO] {
            let l = Lun::new();
            l.register(1, 1);
            l.register(2, 2);
            l.reserve(1, 1, t);
            assert_good(l.out(1, REGISTER, 0, 1, 0));
            assert_eq!(l.reservation(1), None, "type {t}");
            if registrants_only(t) {
                l.assert_ua(2, SenseCode::RESERVATIONS_RELEASED);
            }
            l.assert_no_ua(2);
            l.assert_no_ua(1);
            // Changing the holder's key keeps the reservation.
            l.reserve(2, 2, t);
            assert_good(l.out(2, REGISTER, 0, 2, 0x22));
            l.held_by(0x22, t);
        }
    }

    // ---- All registrants ----

    #[test]
    fn every_registrant_holds_an_all_registrants_reservation() {
        for t in [WE_AR, EA_AR] {
            let l = Lun::new();
            l.register(1, 1);
            l.register(2, 2);
            l.register(3, 3);
            l.reserve(1, 1, t);
            for d in l.full_status(4) {
                assert!(d.reservation_holder);
                assert_eq!(d.pr_type, t);
            }
            // Each registrant holds it: the same RESERVE is GOOD.
            l.reserve(2, 2, t);
            assert_conflict(l.out(3, RESERVE, WE, 3, 0));
            // The reservation stays until the last registrant goes.
            assert_good(l.out(1, REGISTER, 0, 1, 0));
            assert_good(l.out(2, REGISTER, 0, 2, 0));
            l.held_by(0, t);
            let full = l.full_status(4);
            assert_eq!(full.len(), 1);
            assert!(full[0].reservation_holder);
            assert_good(l.out(3, REGISTER, 0, 3, 0));
            assert_eq!(l.reservation(4), None);
            for n in 1..=3 {
                l.assert_no_ua(n);
            }
        }
    }

    #[test]
    fn any_registrant_releases_an_all_registrants_reservation() {
        let l = Lun::new();
        l.register(1, 1);
        l.register(2, 2);
        l.register(3, 3);
        l.reserve(1, 1, EA_AR);
        assert_sense(l.out(2, RELEASE, WE_AR, 2, 0), SenseCode::INVALID_RELEASE);
        assert_good(l.out(2, RELEASE, EA_AR, 2, 0));
        assert_eq!(l.reservation(4), None);
        l.assert_ua(1, SenseCode::RESERVATIONS_RELEASED);
        l.assert_ua(3, SenseCode::RESERVATIONS_RELEASED);
        l.assert_no_ua(2);
        assert!(l.full_status(2).iter().all(|d| !d.reservation_holder));
    }

    // ---- CLEAR ----

    #[test]
    fn clear_removes_everything() {
        let l = Lun::new();
        l.register(1, 1);
        l.register(2, 2);
        l.register(3, 3);
        l.reserve(1, 1, EA);
        assert_good(l.out(2, CLEAR, 0, 2, 0));
        assert_eq!(l.keys(2), (4, vec![]));
        assert_eq!(l.reservation(2), None);
        l.assert_ua(1, SenseCode::RESERVATIONS_PREEMPTED);
        l.assert_ua(3, SenseCode::RESERVATIONS_PREEMPTED);
        l.assert_no_ua(1);
        // Nobody is registered any more: CLEAR conflicts.
        assert_conflict(l.out(2, CLEAR, 0, 2, 0));
        assert_eq!(l.generation(2), 4);
    }

    // ---- PREEMPT and PREEMPT AND ABORT ----

    #[test]
    fn preempt_removes_registrations_when_nothing_is_reserved() {
        for sa in [PREEMPT, PREEMPT_AND_ABORT] {
            let l = Lun::new();
            l.register(1, 0xa);
            l.register(2, 0xb);
            l.register(3, 0xa);
            let g = l.generation(2);
            // A key nobody holds conflicts; key 0 is invalid here.
            assert_conflict(l.out(2, sa, EA, 0xb, 0xc));
            assert_sense(l.out(2, sa, EA, 0xb, 0), SenseCode::INVALID_PARAM);
            assert_eq!(l.generation(2), g);
            assert_good(l.out(2, sa, EA, 0xb, 0xa));
            assert_eq!(l.keys(2), (g + 1, vec![0xb]));
            // No reservation is made.
            assert_eq!(l.reservation(2), None);
            l.assert_ua(1, SenseCode::REGISTRATIONS_PREEMPTED);
            l.assert_ua(3, SenseCode::REGISTRATIONS_PREEMPTED);
            l.assert_no_ua(2);
        }
    }

    #[test]
    fn preempt_the_reservation_holder() {
        for sa in [PREEMPT, PREEMPT_AND_ABORT] {
            for new_type in [WE_RO, EA] {
                let l = Lun::new();
                l.register(1, 0xa);
                l.register(2, 0xb);
                l.register(3, 0xc);
                l.register(4, 0xa);
                l.reserve(1, 0xa, WE_RO);
                let g = l.generation(5);
                assert_good(l.out(2, sa, new_type, 0xb, 0xa));
                l.held_by(0xb, new_type);
                assert_eq!(l.keys(5), (g + 1, vec![0xb, 0xc]));
                l.assert_ua(1, SenseCode::REGISTRATIONS_PREEMPTED);
                l.assert_ua(4, SenseCode::REGISTRATIONS_PREEMPTED);
                // The others hear of a change of type only.
                if new_type != WE_RO {
                    l.assert_ua(3, SenseCode::RESERVATIONS_RELEASED);
                }
                l.assert_no_ua(3);
                l.assert_no_ua(2);
            }
        }
    }

    #[test]
    fn preempt_a_key_other_than_the_holders_keeps_the_reservation() {
        let l = Lun::new();
        l.register(1, 0xa);
        l.register(2, 0xb);
        l.register(3, 0xc);
        l.reserve(1, 0xa, EA);
        assert_good(l.out(2, PREEMPT, WE, 0xb, 0xc));
        l.held_by(0xa, EA);
        assert_eq!(l.keys(4).1, vec![0xa, 0xb]);
        l.assert_ua(3, SenseCode::REGISTRATIONS_PREEMPTED);
        l.assert_no_ua(1);
    }

    #[test]
    fn preempt_ones_own_reservation() {
        let l = Lun::new();
        l.register(1, 0xa);
        l.register(2, 0xb);
        l.reserve(1, 0xa, WE);
        assert_good(l.out(1, PREEMPT, EA, 0xa, 0xa));
        l.held_by(0xa, EA);
        assert_eq!(l.keys(1).1, vec![0xa, 0xb]);
        l.assert_ua(2, SenseCode::RESERVATIONS_RELEASED);
        l.assert_no_ua(1);
    }

    #[test]
    fn preempt_an_all_registrants_reservation() {
        // SERVICE ACTION RESERVATION KEY 0: everyone else goes.
        let l = Lun::new();
        for n in 1..=3 {
            l.register(n, n * 0x10);
        }
        l.reserve(1, 0x10, WE_AR);
        assert_good(l.out(2, PREEMPT, WE, 0x20, 0));
        l.held_by(0x20, WE);
        assert_eq!(l.keys(2).1, vec![0x20]);
        l.assert_ua(1, SenseCode::REGISTRATIONS_PREEMPTED);
        l.assert_ua(3, SenseCode::REGISTRATIONS_PREEMPTED);
        l.assert_no_ua(2);

        // A non-zero key removes those registrations; the reservation stays.
        let l = Lun::new();
        for n in 1..=3 {
            l.register(n, n * 0x10);
        }
        l.reserve(1, 0x10, EA_AR);
        assert_good(l.out(2, PREEMPT, WE, 0x20, 0x10));
        l.held_by(0, EA_AR);
        assert_eq!(l.keys(2).1, vec![0x20, 0x30]);
        l.assert_ua(1, SenseCode::REGISTRATIONS_PREEMPTED);
        // Removing the last registrants ends it.
        assert_good(l.out(2, PREEMPT, WE, 0x20, 0x30));
        assert_good(l.out(2, PREEMPT, WE, 0x20, 0x20));
        assert_eq!(l.keys(2).1, Vec::<u64>::new());
        assert_eq!(l.reservation(2), None);
    }

    #[test]
    fn preempt_checks_type_and_scope() {
        let l = Lun::new();
        l.register(1, 1);
        l.register(2, 2);
        for t in [0, 2, 4, 9, 0xf] {
            assert_sense(l.out(2, PREEMPT, t, 2, 1), SenseCode::INVALID_FIELD);
        }
        assert_sense(l.out(2, PREEMPT, 0x10 | WE, 2, 1), SenseCode::INVALID_FIELD);
        assert_eq!(l.keys(1), (2, vec![1, 2]));
    }

    // ---- Unit attentions ----

    #[test]
    fn unit_attention_is_reported_once_and_clears_the_queue() {
        let l = Lun::new();
        l.register(1, 1);
        l.register(2, 2);
        l.reserve(1, 1, WE_RO);
        // RESERVATIONS RELEASED, then REGISTRATIONS PREEMPTED.
        assert_good(l.out(1, RELEASE, WE_RO, 1, 0));
        assert_good(l.out(1, PREEMPT, WE, 1, 2));
        // A PR OUT reports the oldest and is not run.
        assert_sense(
            l.out(2, REGISTER_AND_IGNORE, 0, 0, 0x22),
            SenseCode::RESERVATIONS_RELEASED,
        );
        // The queue is empty now: the same command runs.
        assert_good(l.out(2, REGISTER_AND_IGNORE, 0, 0, 0x22));
        assert_eq!(l.keys(2).1, vec![1, 0x22]);
    }

    #[test]
    fn unit_attentions_belong_to_one_logical_unit_and_connection() {
        let emu = Arc::new(Emulated::new());
        let a = Lun::on(Arc::clone(&emu));
        let b = Lun::on(Arc::clone(&emu));
        a.register(1, 1);
        a.register(2, 2);
        b.register(2, 2);
        assert_good(a.out(1, CLEAR, 0, 1, 0));
        b.assert_no_ua(2);
        a.assert_ua(2, SenseCode::RESERVATIONS_PREEMPTED);
        // A connection that goes away drops its unit attentions.
        a.register(3, 3);
        a.register(4, 4);
        assert_good(a.out(3, CLEAR, 0, 3, 0));
        emu.disconnect(4);
        a.assert_no_ua(4);
    }

    // ---- Generation ----

    #[test]
    fn generation_counts_successful_register_clear_preempt_and_move() {
        let l = Lun::new();
        let g = |n| l.generation(n);
        l.register(1, 1);
        l.assert_no_ua(2);
        assert_eq!(g(1), 1);
        // Refused commands do not count.
        assert_conflict(l.out(1, REGISTER, 0, 9, 2));
        assert_sense(
            l.out_raw(1, REGISTER, 0, &[0; 23]),
            SenseCode::INVALID_PARAM_LEN,
        );
        assert_eq!(g(1), 1);
        // RESERVE and RELEASE do not count.
        l.reserve(1, 1, WE);
        assert_good(l.out(1, RELEASE, WE, 1, 0));
        assert_eq!(g(1), 1);
        l.register(2, 2);
        assert_good(l.out(1, REGISTER, 0, 1, 0x11));
        assert_eq!(g(1), 3);
        l.reserve(1, 0x11, WE);
        assert_good(l.out_raw(
            1,
            REGISTER_AND_MOVE,
            0,
            &move_params(0x11, 0x12, false, 1, &tid(2)),
        ));
        assert_eq!(g(1), 4);
        assert_good(l.out(2, PREEMPT, EA, 0x12, 0x11));
        assert_eq!(g(2), 5);
        assert_good(l.out(2, PREEMPT_AND_ABORT, EA, 0x12, 0x12));
        assert_eq!(g(2), 6);
        assert_good(l.out(2, CLEAR, 0, 0x12, 0));
        assert_eq!(g(2), 7);
    }

    // ---- SPEC_I_PT ----

    #[test]
    fn spec_i_pt_registers_the_named_initiators() {
        let l = Lun::new();
        for n in [1, 2, 3] {
            l.assert_no_ua(n);
        }
        let p = spec_i_pt(0, 0x77, &[tid(3), tid(2)]);
        assert_good(l.out_raw(1, REGISTER, 0, &p));
        assert_eq!(l.keys(1), (1, vec![0x77; 3]));
        let order: Vec<_> = l
            .full_status(1)
            .iter()
            .map(|d| {
                Emulated::initiator_nexus(&reservd_proto::prin::descriptor_transport_id(d).unwrap())
            })
            .collect();
        assert_eq!(order, vec![Some(1), Some(3), Some(2)]);
        // The registered initiators use the key like any other.
        l.reserve(3, 0x77, WE);
    }

    #[test]
    fn spec_i_pt_accepts_an_initiator_port_transport_id() {
        let l = Lun::new();
        l.assert_no_ua(1);
        l.assert_no_ua(2);
        let port = TransportId::Iscsi {
            format: 1,
            name: format!("{INITIATOR_NAME_PREFIX}2,i,0x23d000000001").into_bytes(),
        };
        assert_good(l.out_raw(1, REGISTER, 0, &spec_i_pt(0, 5, &[port])));
        assert_eq!(l.keys(2).1, vec![5, 5]);
    }

    #[test]
    fn spec_i_pt_refusals_register_nothing() {
        let l = Lun::new();
        for n in [1, 2, 3] {
            l.assert_no_ua(n);
        }
        l.register(3, 3);
        let unknown = tid(42);
        let foreign = TransportId::Iscsi {
            format: 0,
            name: b"iqn.1994-05.com.redhat:client".to_vec(),
        };
        let padded = TransportId::Iscsi {
            format: 0,
            name: format!("{INITIATOR_NAME_PREFIX}02").into_bytes(),
        };
        let fc = TransportId::Fc {
            n_port_name: [2; 8],
        };
        for tids in [
            vec![tid(2), unknown],
            vec![foreign],
            vec![padded],
            vec![fc],
            vec![tid(2), tid(2)],
            vec![tid(1)],
            vec![tid(2), tid(3)],
        ] {
            assert_sense(
                l.out_raw(1, REGISTER, 0, &spec_i_pt(0, 9, &tids)),
                SenseCode::INVALID_PARAM,
            );
        }
        assert_eq!(l.keys(1), (1, vec![3]));
        // SPEC_I_PT from a registered nexus, or with another service action.
        assert_sense(
            l.out_raw(3, REGISTER, 0, &spec_i_pt(3, 9, &[tid(2)])),
            SenseCode::INVALID_PARAM,
        );
        for sa in [REGISTER_AND_IGNORE, RESERVE, CLEAR] {
            assert_sense(
                l.out_raw(3, sa, WE, &spec_i_pt(3, 9, &[tid(2)])),
                SenseCode::INVALID_PARAM,
            );
        }
        assert_eq!(l.keys(1), (1, vec![3]));
    }

    #[test]
    fn registrations_beyond_capacity_are_refused() {
        let l = Lun::on(Arc::new(Emulated::with_max_registrations(2)));
        for n in [1, 2, 3] {
            l.assert_no_ua(n);
        }
        assert_sense(
            l.out_raw(1, REGISTER, 0, &spec_i_pt(0, 9, &[tid(2), tid(3)])),
            SenseCode::INSUFFICIENT_REGISTRATION_RESOURCES,
        );
        assert_eq!(l.keys(1), (0, vec![]));
        l.register(1, 1);
        l.register(2, 2);
        assert_sense(
            l.out(3, REGISTER, 0, 0, 3),
            SenseCode::INSUFFICIENT_REGISTRATION_RESOURCES,
        );
        // Changing a key needs no room.
        assert_good(l.out(2, REGISTER, 0, 2, 0x22));
        assert_eq!(l.keys(1), (3, vec![1, 0x22]));
    }

    // ---- PR IN data ----

    #[test]
    fn read_full_status_bytes() {
        let l = Lun::new();
        assert_good(l.out_raw(1, REGISTER, 0, &basic(0, 0x1111, FLAG_ALL_TG_PT)));
        l.register(2, 0x2222);
        l.reserve(2, 0x2222, EA_RO);
        let d = l.data(1, prin_sa::READ_FULL_STATUS);
        let tid = |n: u8| {
            // 05h iSCSI, format 00; ADDITIONAL LENGTH 32: 31 characters,
            // a NUL, no padding needed.
            let mut t = vec![0x05, 0x00, 0x00, 0x20];
            t.extend_from_slice(b"iqn.2026-11.org.reservd:nexus-");
            t.push(b'0' + n);
            t.push(0);
            t
        };
        let mut want = vec![0, 0, 0, 2, 0, 0, 0, 120];
        // Nexus 1: ALL_TG_PT, not a holder, RELATIVE TARGET PORT 0.
        want.extend_from_slice(&0x1111u64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 0, 0x02, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 36]);
        want.extend_from_slice(&tid(1));
        // Nexus 2: holder of EA_RO through target port 1.
        want.extend_from_slice(&0x2222u64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 0, 0x01, 0x06, 0, 0, 0, 0, 0, 1, 0, 0, 0, 36]);
        want.extend_from_slice(&tid(2));
        assert_eq!(d, want);
    }

    #[test]
    fn read_keys_and_read_reservation_bytes() {
        let l = Lun::new();
        assert_eq!(l.data(1, prin_sa::READ_KEYS), [0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            l.data(1, prin_sa::READ_RESERVATION),
            [0, 0, 0, 0, 0, 0, 0, 0]
        );
        l.register(1, 0x0102030405060708);
        l.reserve(1, 0x0102030405060708, WE_RO);
        assert_eq!(
            l.data(1, prin_sa::READ_KEYS),
            [0, 0, 0, 1, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(
            l.data(1, prin_sa::READ_RESERVATION),
            [0, 0, 0, 1, 0, 0, 0, 16, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0x05, 0, 0]
        );
    }

    #[test]
    fn report_capabilities_follows_aptpl() {
        let l = Lun::new();
        let rc = |l: &Lun| l.data(1, prin_sa::REPORT_CAPABILITIES);
        assert_eq!(rc(&l), [0x00, 0x08, 0x1d, 0x90, 0xea, 0x01, 0x00, 0x00]);
        assert_good(l.out_raw(1, REGISTER, 0, &basic(0, 1, FLAG_APTPL)));
        assert_eq!(rc(&l)[3], 0x91);
        assert!(l.capabilities(1).ptpl_a);
        // Only the register service actions set it.
        assert_good(l.out_raw(1, RESERVE, WE, &basic(1, 0, 0)));
        assert_eq!(rc(&l)[3], 0x91);
        assert_good(l.out_raw(1, REGISTER, 0, &basic(1, 2, 0)));
        assert_eq!(rc(&l)[3], 0x90);
        assert_good(l.out_raw(1, REGISTER, 0, &basic(2, 3, FLAG_APTPL)));
        assert_good(l.out(1, CLEAR, 0, 3, 0));
        assert_eq!(rc(&l)[3], 0x90);
    }

    // ---- CDB and parameter list checks ----

    #[test]
    fn scope_and_type_are_checked() {
        let l = Lun::new();
        l.register(1, 1);
        for t in [0, 2, 4, 9, 0xf] {
            assert_sense(l.out(1, RESERVE, t, 1, 0), SenseCode::INVALID_FIELD);
        }
        for scope in [1, 2, 0xf] {
            assert_sense(
                l.out(1, RESERVE, scope << 4 | WE, 1, 0),
                SenseCode::INVALID_FIELD,
            );
        }
        assert_eq!(l.reservation(1), None);
    }

    #[test]
    fn service_action_range() {
        let l = Lun::new();
        for sa in 0..4 {
            assert_good(l.prin(1, sa));
        }
        for sa in 4..0x20 {
            assert_sense(l.prin(1, sa), SenseCode::INVALID_FIELD);
        }
        l.register(1, 1);
        for sa in 8..0x20 {
            assert_sense(l.out(1, sa, WE, 1, 0), SenseCode::INVALID_FIELD);
            assert_sense(l.out_raw(1, sa, WE, &[]), SenseCode::INVALID_PARAM_LEN);
        }
    }

    #[test]
    fn parameter_list_length_rules() {
        let l = Lun::new();
        for len in [0, 23, 25, 32] {
            assert_sense(
                l.out_raw(1, REGISTER, 0, &vec![0; len]),
                SenseCode::INVALID_PARAM_LEN,
            );
        }
        assert_eq!(l.keys(1), (0, vec![]));
        // The CDB says more than arrived (bytes 5..6 set): the data is short.
        let p = basic(0, 1, 0);
        let mut cdb = cdb_out(REGISTER, 0, 24);
        cdb[6] = 1;
        assert_sense(l.run(1, cdb, &p), SenseCode::INVALID_FIELD);
        // The CDB says less: only that many bytes are the parameter list.
        let mut more = p.clone();
        more.extend_from_slice(&[0xee; 8]);
        assert_good(l.run(1, cdb_out(REGISTER, 0, 24), &more));
        assert_eq!(l.keys(1), (1, vec![1]));
    }

    // ---- REGISTER AND MOVE ----

    #[test]
    fn register_and_move() {
        for unreg in [false, true] {
            let l = Lun::new();
            l.register(1, 0xa);
            l.assert_no_ua(2);
            l.reserve(1, 0xa, WE);
            assert_good(l.out_raw(
                1,
                REGISTER_AND_MOVE,
                0,
                &move_params(0xa, 0xb, unreg, 1, &tid(2)),
            ));
            l.held_by(0xb, WE);
            assert_eq!(
                l.keys(1),
                (2, if unreg { vec![0xb] } else { vec![0xa, 0xb] })
            );
            let holder: Vec<_> = l
                .full_status(1)
                .iter()
                .map(|d| d.reservation_holder)
                .collect();
            assert_eq!(holder, if unreg { vec![true] } else { vec![false, true] });
            // Moving it back replaces nexus 1's key if it is still registered.
            if !unreg {
                assert_good(l.out_raw(
                    2,
                    REGISTER_AND_MOVE,
                    0,
                    &move_params(0xb, 0xc, false, 1, &tid(1)),
                ));
                l.held_by(0xc, WE);
                assert_eq!(l.keys(1).1, vec![0xc, 0xb]);
            }
        }
    }

    #[test]
    fn register_and_move_refusals() {
        let l = Lun::new();
        l.register(1, 0xa);
        l.register(2, 0xb);
        let mv = |n, key, sa_key, rtpi, t: &TransportId| {
            l.out_raw(
                n,
                REGISTER_AND_MOVE,
                0,
                &move_params(key, sa_key, false, rtpi, t),
            )
        };
        // Nothing to move.
        assert_sense(mv(1, 0xa, 0xc, 1, &tid(2)), SenseCode::INVALID_FIELD);
        l.reserve(1, 0xa, EA);
        assert_sense(mv(1, 0xa, 0, 1, &tid(2)), SenseCode::INVALID_PARAM);
        assert_sense(mv(1, 0xa, 0xc, 2, &tid(2)), SenseCode::INVALID_PARAM);
        assert_sense(mv(1, 0xa, 0xc, 1, &tid(1)), SenseCode::INVALID_PARAM);
        assert_sense(mv(1, 0xa, 0xc, 1, &tid(77)), SenseCode::INVALID_PARAM);
        assert_conflict(mv(1, 0xb, 0xc, 1, &tid(2)));
        // Only the holder moves it.
        assert_conflict(mv(2, 0xb, 0xc, 1, &tid(1)));
        l.held_by(0xa, EA);
        assert_good(l.out(1, RELEASE, EA, 0xa, 0));
        // An all-registrants reservation cannot move.
        l.reserve(1, 0xa, WE_AR);
        assert_conflict(mv(1, 0xa, 0xc, 1, &tid(2)));
        l.held_by(0, WE_AR);
        assert_eq!(l.keys(1).1, vec![0xa, 0xb]);
    }

    // ---- Logical units, opcodes, concurrency ----

    #[test]
    fn logical_units_are_files_and_devices() {
        let emu = Arc::new(Emulated::new());
        let a = Lun::on(Arc::clone(&emu));
        let b = Lun::on(Arc::clone(&emu));
        a.register(1, 1);
        assert_eq!(b.keys(1), (0, vec![]));
        // Another fd to the same file reaches the same logical unit.
        let again = File::open(&a.disk.path).unwrap();
        let cmd = cdb_in(prin_sa::READ_KEYS);
        let r = emu
            .execute(&Command {
                nexus: 1,
                peer: None,
                fd: again.as_fd(),
                cdb: &cmd,
                params: &[],
            })
            .unwrap();
        assert_eq!(parse_read_keys(&r.data).unwrap().1, vec![1]);
        // Character devices are told apart by device number.
        let n1 = File::open("/dev/null").unwrap();
        let n2 = File::open("/dev/null").unwrap();
        let z = File::open("/dev/zero").unwrap();
        let id = |f: &File| LuId::of(f.as_fd()).unwrap();
        assert_eq!(id(&n1), id(&n2));
        assert_ne!(id(&n1), id(&z));
        assert!(matches!(id(&n1), LuId::Device(_)));
        assert!(matches!(id(&a.disk.file), LuId::File { .. }));
    }

    #[test]
    fn read_only_fd_and_other_opcodes() {
        let l = Lun::new();
        let ro = File::open(&l.disk.path).unwrap();
        let run = |cdb: [u8; 16], params: &[u8]| {
            reservd_daemon::backend::execute(
                l.emu.as_ref(),
                &Command {
                    nexus: 1,
                    peer: None,
                    fd: ro.as_fd(),
                    cdb: &cdb,
                    params,
                },
            )
            .unwrap()
        };
        let p = basic(0, 1, 0);
        assert_sense(run(cdb_out(REGISTER, 0, 24), &p), SenseCode::INVALID_OPCODE);
        assert_good(run(cdb_in(prin_sa::READ_KEYS), &[]));
        assert_eq!(l.keys(1), (0, vec![]));
        let mut cleanup = [0u8; 16];
        cleanup[0] = OP_CLEANUP;
        assert_good(l.run(1, cleanup, &[]));
        let mut tur = [0u8; 16];
        tur[0] = 0x00;
        assert_sense(l.run(1, tur, &[]), SenseCode::INVALID_OPCODE);
    }

    #[test]
    fn concurrent_registrations() {
        let l = Arc::new(Lun::new());
        let threads: Vec<_> = (1..=16u64)
            .map(|n| {
                let l = Arc::clone(&l);
                std::thread::spawn(move || {
                    for i in 0..20 {
                        assert_good(l.out(n, REGISTER_AND_IGNORE, 0, 0, n << 8 | (i + 1)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (g, mut keys) = l.keys(100);
        assert_eq!(g, 16 * 20);
        keys.sort_unstable();
        assert_eq!(keys, (1..=16u64).map(|n| n << 8 | 20).collect::<Vec<_>>());
    }

    #[test]
    fn initiator_names() {
        assert_eq!(
            tid(7),
            TransportId::Iscsi {
                format: 0,
                name: b"iqn.2026-11.org.reservd:nexus-7".to_vec()
            }
        );
        assert_eq!(Emulated::initiator_nexus(&tid(u64::MAX)), Some(u64::MAX));
        let port = |s: &str| TransportId::Iscsi {
            format: 1,
            name: s.as_bytes().to_vec(),
        };
        assert_eq!(
            Emulated::initiator_nexus(&port("iqn.2026-11.org.reservd:nexus-3,i,0x1")),
            Some(3)
        );
        // Format 01 needs the separator.
        assert_eq!(
            Emulated::initiator_nexus(&port("iqn.2026-11.org.reservd:nexus-3")),
            None
        );
        assert_eq!(
            Emulated::initiator_nexus(&TransportId::Sas { address: [0; 8] }),
            None
        );
        let e = Emulated::new();
        let d = Disk::new();
        for n in [9, 4] {
            e.execute(&Command {
                nexus: n,
                peer: None,
                fd: d.file.as_fd(),
                cdb: &cdb_in(0),
                params: &[],
            })
            .unwrap();
        }
        assert_eq!(e.initiators(), vec![4, 9]);
    }

    // ---- Scenarios of libiscsi's iscsi-test-cu PR suite ----

    /// The answer reservd's server sends for `answer` to a PR IN with
    /// allocation length `alloc`: (status, size, data).
    fn on_the_wire(sa: u8, alloc: u16, answer: &Answer) -> (i32, u32, Vec<u8>) {
        let mut cdb = cdb_in(sa);
        cdb[7..9].copy_from_slice(&alloc.to_be_bytes());
        let r = encode_response(
            &Request {
                cdb,
                params: vec![],
            },
            answer,
        );
        let status = i32::from_be_bytes(r[0..4].try_into().unwrap());
        let size = u32::from_be_bytes(r[4..8].try_into().unwrap());
        (status, size, r[RESPONSE_HEADER_SIZE..].to_vec())
    }

    /// PrinReadKeys.Simple: READ KEYS works; ADDITIONAL LENGTH matches.
    #[test]
    fn libiscsi_prin_read_keys_simple() {
        let l = Lun::new();
        l.register(2, 0x1234);
        let (status, size, d) = on_the_wire(0, 8192, &l.prin(1, prin_sa::READ_KEYS));
        assert_eq!(status, 0);
        assert!(size >= 8);
        assert_eq!(
            u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize,
            d.len() - 8
        );
    }

    /// PrinReadKeys.Truncate: with an allocation length of 8 the header
    /// stays, with the full ADDITIONAL LENGTH.
    #[test]
    fn libiscsi_prin_read_keys_truncate() {
        let l = Lun::new();
        l.register(1, 0x1234);
        let (status, size, d) = on_the_wire(0, 8, &l.prin(1, prin_sa::READ_KEYS));
        assert_eq!((status, size), (0, 8));
        assert_eq!(d, [0, 0, 0, 1, 0, 0, 0, 8]);
    }

    /// PrinServiceactionRange: 0..3 succeed, 4..0x1f are ILLEGAL REQUEST.
    #[test]
    fn libiscsi_prin_serviceaction_range() {
        let l = Lun::new();
        for sa in 0..0x20 {
            let a = l.prin(1, sa);
            if sa < 4 {
                assert_good(a);
            } else {
                assert_eq!(a.sense_code().map(|c| c.key), Some(0x05));
            }
        }
    }

    /// PrinReportCapabilities: length 8, ALLOW COMMANDS at most 5, and every
    /// type of the TYPE MASK can be reserved, read back and released.
    #[test]
    fn libiscsi_prin_report_capabilities() {
        let l = Lun::new();
        let d = l.data(1, prin_sa::REPORT_CAPABILITIES);
        assert_eq!(u16::from_be_bytes([d[0], d[1]]), 8);
        let c = l.capabilities(1);
        assert!(c.allow_commands <= 5);
        assert!(c.tmv);
        l.register(1, 0x42);
        let mut seen = 0;
        for t in 0..16u8 {
            if c.type_mask & prin::type_mask_bit(t) == 0 {
                continue;
            }
            seen += 1;
            l.reserve(1, 0x42, t);
            assert_eq!(l.reservation(1).map(|r| r.pr_type), Some(t));
            assert_good(l.out(1, RELEASE, t, 0x42, 0));
        }
        assert_eq!(seen, 6);
    }

    /// ProutRegister.Simple.
    #[test]
    fn libiscsi_prout_register_simple() {
        let l = Lun::new();
        let k = 0x5151_0000_0000_0001;
        assert_good(l.out(1, REGISTER_AND_IGNORE, 0, 0, k));
        assert!(l.keys(1).1.contains(&k));
        // Registering again with RESERVATION KEY 0 while registered fails.
        assert_conflict(l.out(1, REGISTER, 0, 0, k));
        assert_good(l.out(1, REGISTER, 0, k, 0));
        assert!(!l.keys(1).1.contains(&k));
    }

    /// ProutReserve.Simple.
    #[test]
    fn libiscsi_prout_reserve_simple() {
        let l = Lun::new();
        let k = 0x77;
        l.register(1, k);
        for t in TYPES {
            l.reserve(1, k, t);
            let r = l.reservation(1).unwrap();
            assert_eq!(r.pr_type, t);
            if !pr_type::is_all_registrants(t) {
                assert_eq!(r.key, k);
            }
            assert_good(l.out(1, RELEASE, t, k, 0));
        }
        assert_good(l.out(1, REGISTER, 0, k, 0));
    }

    /// ProutClear.Simple.
    #[test]
    fn libiscsi_prout_clear_simple() {
        let l = Lun::new();
        let k = 0x99;
        l.register(1, k);
        l.reserve(1, k, WE);
        let g = l.generation(1);
        assert_good(l.out(1, CLEAR, 0, k, 0));
        assert_eq!(l.keys(1), (g + 1, vec![]));
        assert_eq!(l.reservation(1), None);
    }

    /// ProutPreempt.RmReg.
    #[test]
    fn libiscsi_prout_preempt_rm_reg() {
        let l = Lun::new();
        let (k1, k2) = (0x1001, 0x2002);
        assert_good(l.out(1, REGISTER_AND_IGNORE, 0, 0, k1));
        assert_good(l.out(1, CLEAR, 0, k1, 0));
        assert_good(l.out(1, REGISTER_AND_IGNORE, 0, 0, k1));
        assert_good(l.out(2, REGISTER_AND_IGNORE, 0, 0, k2));
        let (old, keys) = l.keys(1);
        assert_eq!(keys.len(), 2);
        assert_good(l.out(2, PREEMPT, EA, k2, k1));
        // The preempted side has a unit attention (libiscsi clears it with
        // TEST UNIT READY; here the next PR command reports it).
        l.assert_ua(1, SenseCode::REGISTRATIONS_PREEMPTED);
        l.assert_no_ua(2);
        assert_eq!(l.keys(1), (old + 1, vec![k2]));
        assert_good(l.out(2, REGISTER, 0, k2, 0));
    }
}
