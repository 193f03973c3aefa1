//! The helper protocol over a real UNIX socket: reservd's server runs
//! in-process with the emulated SPC-4 target (or a test backend that can
//! hang), and each test checks what a client observes: the answer bytes,
//! or the end of the connection with no answer.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use reservd_daemon::server::Config;
use reservd_proto::cdb::{prin_sa, prout_sa};
use reservd_proto::params::{ProutParams, FLAG_SPEC_I_PT};
use reservd_proto::prin::{self, parse_read_full_status, parse_read_keys};
use reservd_proto::sense::SenseCode;
use reservd_proto::wire::FEATURE_CLEANUP;
use reservd_testkit::disks::*;
use reservd_testkit::emulated::{Emulated, TARGET_PORT};
use reservd_testkit::frames::*;
use reservd_testkit::server::*;

const WE_RO: u8 = 5;
const EA: u8 = 3;

fn cleanup_config() -> Config {
    Config {
        features: FEATURE_CLEANUP,
        ..test_config()
    }
}

// ---- Handshake ----

#[test]
fn server_speaks_first_with_its_features() {
    let (server, _) = TestServer::emulated();
    assert_eq!(read_hello(&mut server.raw()), 0);
    let cleanup = TestServer::start(Arc::new(Emulated::new()), cleanup_config());
    let mut s = cleanup.raw();
    assert_eq!(read_hello(&mut s), FEATURE_CLEANUP);
    // Requesting CLEANUP from a server that offers it: the opcode works.
    s.write_all(&[0, 0, 0, 1]).unwrap();
    let disk = Disk::new();
    let mut op = [0u8; 16];
    op[0] = 0xff;
    send(&s, &op, &[disk.fd()]).unwrap();
    let a = read_answer(&mut s).unwrap();
    assert_eq!((a.status.0, a.data.len()), (0, 0));
    assert!(a.sense.iter().all(|&b| b == 0));
}

#[test]
fn requesting_unknown_features_closes_the_connection() {
    let (server, _) = TestServer::emulated();
    let cleanup = TestServer::start(Arc::new(Emulated::new()), cleanup_config());
    for (srv, bits) in [
        (&server, 1u32),
        (&server, 0x8000_0000),
        (&cleanup, 2),
        (&cleanup, 3),
    ] {
        let mut s = srv.raw();
        read_hello(&mut s);
        s.write_all(&bits.to_be_bytes()).unwrap();
        assert_closed(&mut s);
    }
    server.assert_serves();
    cleanup.assert_serves();
}

#[test]
fn an_fd_with_the_handshake_closes_the_connection() {
    let (server, _) = TestServer::emulated();
    let disk = Disk::new();
    let mut s = server.raw();
    read_hello(&mut s);
    send(&s, &[0, 0, 0, 0], &[disk.fd()]).unwrap();
    assert_closed(&mut s);
    server.assert_serves();
}

// ---- Close rules ----

#[test]
fn a_cdb_without_fd_closes_the_connection() {
    let (server, _) = TestServer::emulated();
    let mut s = server.ready();
    send(&s, &cdb_in(0, 8192), &[]).unwrap();
    assert_closed(&mut s);
    server.assert_serves();
}

#[test]
fn two_fds_in_one_message_close_the_connection() {
    let (server, _) = TestServer::emulated();
    let (a, b) = (Disk::new(), Disk::new());
    let mut s = server.ready();
    send(&s, &cdb_in(0, 8192), &[a.fd(), b.fd()]).unwrap();
    assert_closed(&mut s);
    server.assert_serves();
}

#[test]
fn fds_split_over_one_cdb_close_the_connection() {
    let (server, _) = TestServer::emulated();
    let (a, b) = (Disk::new(), Disk::new());
    let mut s = server.ready();
    let c = cdb_in(0, 8192);
    send(&s, &c[..8], &[a.fd()]).unwrap();
    send(&s, &c[8..], &[b.fd()]).unwrap();
    assert_closed(&mut s);
    server.assert_serves();
}

#[test]
fn ten_fds_truncate_the_control_message_and_close_the_connection() {
    let (server, _) = TestServer::emulated();
    let disks: Vec<Disk> = (0..10).map(|_| Disk::new()).collect();
    let fds: Vec<_> = disks.iter().map(|d| d.fd()).collect();
    let mut s = server.ready();
    send(&s, &cdb_in(0, 8192), &fds).unwrap();
    assert_closed(&mut s);
    server.assert_serves();
}

#[test]
fn other_opcodes_close_the_connection() {
    let (server, _) = TestServer::emulated();
    let disk = Disk::new();
    // 0xFF is CLEANUP only where the server offers it.
    for op in [0x00, 0x12, 0x5d, 0xa3, 0xff] {
        let mut s = server.ready();
        let mut c = cdb_in(0, 8);
        c[0] = op;
        send(&s, &c, &[disk.fd()]).unwrap();
        assert_closed(&mut s);
    }
    server.assert_serves();
}

#[test]
fn transfer_lengths_above_8192_close_the_connection() {
    let (server, _) = TestServer::emulated();
    let disk = Disk::new();
    for c in [
        cdb_in(0, 8193),
        cdb_in(0, 0xffff),
        cdb_out(prout_sa::REGISTER, 0, 8193),
        cdb_out(prout_sa::REGISTER, 0, 0xffff),
    ] {
        let mut s = server.ready();
        send(&s, &c, &[disk.fd()]).unwrap();
        assert_closed(&mut s);
    }
    // 8192 is served, in both directions.
    let mut s = server.ready();
    send(&s, &cdb_in(0, 8192), &[disk.fd()]).unwrap();
    let a = read_answer(&mut s).unwrap();
    assert_eq!((a.status.0, a.data.len()), (0, 8));
    send(&s, &cdb_out(prout_sa::REGISTER, 0, 8192), &[disk.fd()]).unwrap();
    send(&s, &[0u8; 8192], &[]).unwrap();
    let a = read_answer(&mut s).unwrap();
    assert_eq!(a.sense_code(), Some(SenseCode::INVALID_PARAM_LEN));
    server.assert_serves();
}

#[test]
fn end_of_stream_inside_a_frame_closes_without_answer() {
    let (server, _) = TestServer::emulated();
    let disk = Disk::new();
    // Inside the handshake, the CDB, and the parameter list.
    let mut s = server.raw();
    read_hello(&mut s);
    s.write_all(&[0, 0]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_closed(&mut s);

    let mut s = server.ready();
    send(&s, &cdb_in(0, 8192)[..8], &[disk.fd()]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_closed(&mut s);

    let mut s = server.ready();
    send(&s, &cdb_out(prout_sa::REGISTER, 0, 24), &[disk.fd()]).unwrap();
    send(&s, &params(0, 1, 0)[..10], &[]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_closed(&mut s);

    server.assert_serves();
    // The cut-off REGISTER was not run.
    let r = server
        .client()
        .execute(&cdb_in(0, 8192), disk.fd(), &[])
        .unwrap();
    assert_eq!(r.data, [0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn an_fd_with_the_parameter_list_closes_the_connection() {
    let (server, _) = TestServer::emulated();
    let disk = Disk::new();
    let mut s = server.ready();
    send(&s, &cdb_out(prout_sa::REGISTER, 0, 24), &[disk.fd()]).unwrap();
    send(&s, &params(0, 1, 0), &[disk.fd()]).unwrap();
    assert_closed(&mut s);
    server.assert_serves();
}

/// Bytes sent while a command runs are not read until it has been
/// answered, so a request sent early is served after it, in order (as by
/// qemu-pr-helper, which also reads the next CDB only after answering).
#[test]
fn a_request_sent_while_one_is_in_flight_is_served_after_it() {
    let (gate, _open, server) = gated_server(test_config());
    let disk = Disk::new();
    let mut s = server.ready();
    send(&s, &held(cdb_in(prin_sa::READ_KEYS, 8192)), &[disk.fd()]).unwrap();
    gate.wait_for_held(1);
    send(
        &s,
        &cdb_in(prin_sa::REPORT_CAPABILITIES, 8192),
        &[disk.fd()],
    )
    .unwrap();
    gate.open();
    let first = read_answer(&mut s).unwrap();
    assert_eq!(first.data, [0, 0, 0, 0, 0, 0, 0, 0]);
    let second = read_answer(&mut s).unwrap();
    assert_eq!(
        second.data,
        [0x00, 0x08, 0x1d, 0x90, 0xea, 0x01, 0x00, 0x00]
    );
}

// ---- Response sizes ----

#[test]
fn response_sizes() {
    let (server, _) = TestServer::emulated();
    let disk = Disk::new();
    let mut c = server.client();
    assert_good(
        &c.execute(&cdb_out(0, 0, 24), disk.fd(), &params(0, 0xa, 0))
            .unwrap(),
    );
    let mut other = server.client();
    assert_good(
        &other
            .execute(&cdb_out(0, 0, 24), disk.fd(), &params(0, 0xb, 0))
            .unwrap(),
    );
    let mut s = server.ready();
    let mut ask = |cdb: [u8; 16], p: &[u8]| {
        send(&s, &cdb, &[disk.fd()]).unwrap();
        send(&s, p, &[]).unwrap();
        read_answer(&mut s).unwrap()
    };
    // Allocation length 0: GOOD without data.
    let a = ask(cdb_in(0, 0), &[]);
    assert_eq!((a.status.0, a.data.len()), (0, 0));
    // 8: the header only, with the full ADDITIONAL LENGTH.
    let a = ask(cdb_in(0, 8), &[]);
    assert_eq!((a.status.0, a.data.len()), (0, 8));
    assert_eq!(a.data, [0, 0, 0, 2, 0, 0, 0, 16]);
    // Inside a key.
    let a = ask(cdb_in(0, 20), &[]);
    assert_eq!(a.data.len(), 20);
    assert_eq!(parse_read_keys(&a.data).unwrap(), (2, vec![0xa], true));
    // More than there is: exactly the data.
    let a = ask(cdb_in(0, 8192), &[]);
    assert_eq!(a.data.len(), 24);
    assert_eq!(
        parse_read_keys(&a.data).unwrap(),
        (2, vec![0xa, 0xb], false)
    );
    // PR OUT: never data.
    let a = ask(
        cdb_out(prout_sa::REGISTER_AND_IGNORE, 0, 24),
        &params(0, 0xc, 0),
    );
    assert_eq!((a.status.0, a.data.len()), (0, 0));
    // CHECK CONDITION: no data; 18 bytes of fixed sense, then zeros.
    let a = ask(cdb_in(0x1f, 8192), &[]);
    assert_eq!((a.status.0, a.data.len()), (2, 0));
    assert_eq!(
        a.sense[..18],
        [0x70, 0, 0x05, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0x24, 0x00, 0, 0, 0, 0]
    );
    assert!(a.sense[18..].iter().all(|&b| b == 0));
    // RESERVATION CONFLICT: no data, no sense.
    let a = ask(cdb_out(prout_sa::REGISTER, 0, 24), &params(7, 7, 0));
    assert_eq!((a.status.0, a.data.len()), (0x18, 0));
    assert!(a.sense.iter().all(|&b| b == 0));
}

#[test]
fn pr_out_on_a_read_only_fd_is_invalid_opcode() {
    let (server, _) = TestServer::emulated();
    let disk = Disk::new();
    let ro = disk.read_only();
    let mut c = server.client();
    let r = c
        .execute(&cdb_out(0, 0, 24), ro.as_fd(), &params(0, 1, 0))
        .unwrap();
    assert_check(&r, SenseCode::INVALID_OPCODE);
    assert_eq!(
        r.sense[..18],
        [0x70, 0, 0x05, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0x20, 0x00, 0, 0, 0, 0]
    );
    // PR IN works, and nothing was registered.
    let r = c.execute(&cdb_in(0, 8192), ro.as_fd(), &[]).unwrap();
    assert_eq!(r.data, [0, 0, 0, 0, 0, 0, 0, 0]);
}

/// The framing takes the PR OUT length from CDB bytes 7..8 only; bytes
/// 5..6 reach the target, which sees a parameter list shorter than the
/// CDB says.
#[test]
fn pr_out_length_comes_from_cdb_bytes_7_and_8() {
    let (server, _) = TestServer::emulated();
    let disk = Disk::new();
    let mut s = server.ready();
    let mut c = cdb_out(prout_sa::REGISTER, 0, 24);
    c[5] = 0x01;
    send(&s, &c, &[disk.fd()]).unwrap();
    send(&s, &params(0, 1, 0), &[]).unwrap();
    let a = read_answer(&mut s).unwrap();
    assert_eq!(a.sense_code(), Some(SenseCode::INVALID_FIELD));
    // Exactly 24 bytes were read: the next request on the connection works.
    send(&s, &cdb_in(0, 8192), &[disk.fd()]).unwrap();
    let a = read_answer(&mut s).unwrap();
    assert_eq!(a.data, [0, 0, 0, 0, 0, 0, 0, 0]);
}

// ---- A persistent reservation session across two I_T nexuses ----

#[test]
fn spc4_sequence_across_two_connections() {
    let (server, emu) = TestServer::emulated();
    let disk = Disk::new();
    let fd = disk.fd();
    let mut a = server.client();
    let mut b = server.client();
    let (ka, kb) = (0xaaaa_0000_0000_0001u64, 0xbbbb_0000_0000_0002u64);
    let out = |c: &mut reservd_client::client::Client, sa: u8, t: u8, p: &[u8]| {
        c.execute(&cdb_out(sa, t, p.len() as u16), fd, p).unwrap()
    };
    let inq = |c: &mut reservd_client::client::Client, sa: u8| {
        c.execute(&cdb_in(sa, 8192), fd, &[]).unwrap()
    };

    assert_good(&out(&mut a, prout_sa::REGISTER, 0, &params(0, ka, 0)));
    assert_good(&out(&mut b, prout_sa::REGISTER, 0, &params(0, kb, 0)));
    let (na, nb) = match emu.initiators()[..] {
        [x, y] => (x, y),
        ref v => panic!("initiators {v:?}"),
    };
    let r = inq(&mut a, prin_sa::READ_KEYS);
    assert_eq!(parse_read_keys(&r.data).unwrap(), (2, vec![ka, kb], false));

    // A reserves; B conflicts.
    assert_good(&out(&mut a, prout_sa::RESERVE, WE_RO, &params(ka, 0, 0)));
    assert_eq!(
        out(&mut b, prout_sa::RESERVE, WE_RO, &params(kb, 0, 0))
            .status
            .0,
        0x18
    );
    assert_eq!(
        out(&mut b, prout_sa::RESERVE, EA, &params(kb, 0, 0))
            .status
            .0,
        0x18
    );
    let r = inq(&mut b, prin_sa::READ_RESERVATION);
    assert_eq!(
        prin::parse_read_reservation(&r.data).unwrap(),
        (
            2,
            Some(prin::Reservation {
                key: ka,
                scope: 0,
                pr_type: WE_RO
            })
        )
    );

    // B preempts A: A's next command reports the unit attention, once.
    assert_good(&out(&mut b, prout_sa::PREEMPT, EA, &params(kb, ka, 0)));
    assert_check(
        &inq(&mut a, prin_sa::READ_KEYS),
        SenseCode::REGISTRATIONS_PREEMPTED,
    );
    let r = inq(&mut a, prin_sa::READ_KEYS);
    assert_eq!(parse_read_keys(&r.data).unwrap(), (3, vec![kb], false));
    assert_eq!(
        out(&mut a, prout_sa::RESERVE, EA, &params(ka, 0, 0))
            .status
            .0,
        0x18
    );

    // READ FULL STATUS names B's initiator port as the holder.
    let r = inq(&mut a, prin_sa::READ_FULL_STATUS);
    let (generation, descs) = parse_read_full_status(&r.data).unwrap();
    assert_eq!(generation, 3);
    assert_eq!(
        descs,
        vec![prin::FullStatusDescriptor {
            key: kb,
            all_tg_pt: false,
            reservation_holder: true,
            scope: 0,
            pr_type: EA,
            relative_target_port: TARGET_PORT,
            transport_id: Emulated::initiator_transport_id(nb).encode(),
        }]
    );

    // B clears; then A registers both initiator ports with SPEC_I_PT.
    assert_good(&out(&mut b, prout_sa::RELEASE, EA, &params(kb, 0, 0)));
    assert_good(&out(&mut b, prout_sa::CLEAR, 0, &params(kb, 0, 0)));
    let p = ProutParams {
        sa_key: 0x5eed,
        spec_i_pt: true,
        transport_ids: vec![Emulated::initiator_transport_id(nb)],
        ..Default::default()
    }
    .encode();
    assert_eq!(p[20], FLAG_SPEC_I_PT);
    assert_good(&out(&mut a, prout_sa::REGISTER, 0, &p));
    let r = inq(&mut b, prin_sa::READ_FULL_STATUS);
    let names: Vec<_> = parse_read_full_status(&r.data)
        .unwrap()
        .1
        .iter()
        .map(|d| Emulated::initiator_nexus(&prin::descriptor_transport_id(d).unwrap()))
        .collect();
    assert_eq!(names, vec![Some(na), Some(nb)]);
    assert_good(&out(&mut b, prout_sa::RESERVE, EA, &params(0x5eed, 0, 0)));
}

// ---- Hung devices, fds, shutdown, load ----

#[test]
fn a_hung_request_does_not_delay_other_connections() {
    let (gate, _open, server) = gated_server(test_config());
    let disk = Disk::new();
    let mut hung = server.ready();
    let c = held(cdb_in(0, 8192));
    send(&hung, &c, &[disk.fd()]).unwrap();
    gate.wait_for_held(1);

    let start = Instant::now();
    let mut other = server.client();
    for _ in 0..50 {
        assert_good(&other.execute(&cdb_in(0, 8192), disk.fd(), &[]).unwrap());
    }
    server.assert_serves();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(gate.held(), 1);

    gate.open();
    let a = read_answer(&mut hung).unwrap();
    assert_eq!((a.status.0, a.data.len()), (0, 8));
}

/// What the client has sent that the server has not read yet: the kernel's
/// SIOCOUTQ count (message sizes plus the kernel's own bookkeeping).
#[allow(unsafe_code)]
fn unread_by_server(s: &UnixStream) -> libc::c_int {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, which
    // points to `n`; `s` is an open socket for the whole call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    assert_eq!(r, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    n
}

/// A PR IN request stays in the client's socket while its command runs
/// and is read just before the answer is written: reading it frees the
/// client's message, and the kernel then wakes the client's thread, asleep
/// until the answer, for nothing. A PR OUT is read at once (its parameter
/// list follows the CDB).
#[test]
fn a_pr_in_request_is_read_when_its_answer_is_ready() {
    let (gate, _open, server) = gated_server(test_config());
    let disk = Disk::new();
    let mut s = server.ready();

    let c = held(cdb_in(prin_sa::READ_KEYS, 8192));
    send(&s, &c, &[disk.fd()]).unwrap();
    gate.wait_for_held(1);
    assert!(
        unread_by_server(&s) > 0,
        "PR IN read while its command runs"
    );
    gate.open();
    let a = read_answer(&mut s).unwrap();
    assert_eq!((a.status.0, a.data.len()), (0, 8));
    assert_eq!(unread_by_server(&s), 0, "PR IN not read once answered");

    let (gate, _open, server) = gated_server(test_config());
    let mut s = server.ready();
    let c = held(cdb_out(prout_sa::REGISTER, 0, 24));
    send(&s, &c, &[disk.fd()]).unwrap();
    send(&s, &params(0, 0x1234, 0), &[]).unwrap();
    gate.wait_for_held(1);
    assert_eq!(unread_by_server(&s), 0, "PR OUT left unread while it runs");
    gate.open();
    assert_eq!(read_answer(&mut s).unwrap().status.0, 0);
    // The connection goes on, and sees the registration.
    send(&s, &cdb_in(prin_sa::READ_KEYS, 8192), &[disk.fd()]).unwrap();
    let a = read_answer(&mut s).unwrap();
    assert_eq!(a.status.0, 0);
    assert_eq!(parse_read_keys(&a.data).unwrap().1, vec![0x1234]);
}

/// Whether the pipe behind `read_end` has no writer left.
fn writers_gone(read_end: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(read_end.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).unwrap();
    fds[0]
        .revents()
        .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

/// The server closes each received fd before it answers. The "disk" is
/// the write end of a pipe; once the server's copy is closed, the read
/// end reports that no writer is left.
#[test]
fn each_received_fd_is_closed_before_the_answer() {
    let (server, _) = TestServer::emulated();
    let mut s = server.ready();
    let requests: Vec<([u8; 16], Vec<u8>)> = vec![
        (cdb_in(prin_sa::READ_KEYS, 8192), vec![]),
        (cdb_out(prout_sa::REGISTER, 0, 24), params(0, 1, 0)),
        (cdb_out(prout_sa::REGISTER, 0, 0), vec![]),
        (cdb_in(0x1f, 8192), vec![]),
    ];
    for (cdb, p) in requests {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        send(&s, &cdb, &[write_end.as_fd()]).unwrap();
        drop(write_end);
        send(&s, &p, &[]).unwrap();
        read_answer(&mut s).unwrap();
        assert!(writers_gone(&read_end), "fd still open after {cdb:02x?}");
    }
    // And when the connection is closed for a protocol error.
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    send(&s, &cdb_in(0, 8193), &[write_end.as_fd()]).unwrap();
    drop(write_end);
    assert_closed(&mut s);
    let deadline = Instant::now() + TIMEOUT;
    while !writers_gone(&read_end) {
        assert!(Instant::now() < deadline, "fd still open after a close");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn shutdown_answers_the_command_in_flight_and_closes_the_rest() {
    let (gate, _open, mut server) = gated_server(test_config());
    let disk = Disk::new();
    let mut busy = server.ready();
    let c = held(cdb_in(0, 8192));
    send(&busy, &c, &[disk.fd()]).unwrap();
    gate.wait_for_held(1);
    let mut idle = server.ready();
    let mut halfway = server.ready();
    send(&halfway, &cdb_in(0, 8192)[..5], &[disk.fd()]).unwrap();
    // Make sure the server has read the partial CDB and the handshakes.
    server.assert_serves();

    server.shutdown_handle().shutdown();
    assert_closed(&mut idle);
    assert_closed(&mut halfway);
    // The listener is gone; the command in flight still holds the server.
    assert!(UnixStream::connect(&server.path).is_err());
    assert!(!server.has_stopped());

    gate.open();
    let a = read_answer(&mut busy).expect("the command in flight is answered");
    assert_eq!((a.status.0, a.data.len()), (0, 8));
    assert_closed(&mut busy);
    server.join().unwrap();
    assert!(UnixStream::connect(&server.path).is_err());
}

#[test]
fn two_hundred_concurrent_connections() {
    const N: u64 = 200;
    let (server, _) = TestServer::emulated();
    let disk = Arc::new(Disk::new());
    let server = Arc::new(server);
    let barrier = Arc::new(Barrier::new(N as usize));
    let threads: Vec<_> = (1..=N)
        .map(|i| {
            let (server, disk, barrier) = (server.clone(), disk.clone(), barrier.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut c = server.client();
                    barrier.wait();
                    let fd = disk.fd();
                    let key = 0x1000 + i;
                    let r = c
                        .execute(&cdb_out(0, 0, 24), fd, &params(0, key, 0))
                        .unwrap();
                    assert_good(&r);
                    let r = c.execute(&cdb_in(0, 8192), fd, &[]).unwrap();
                    assert!(parse_read_keys(&r.data).unwrap().1.contains(&key));
                    let r = c
                        .execute(&cdb_in(prin_sa::REPORT_CAPABILITIES, 8), fd, &[])
                        .unwrap();
                    assert_eq!(r.data, [0x00, 0x08, 0x1d, 0x90, 0xea, 0x01, 0x00, 0x00]);
                    let r = c
                        .execute(&cdb_out(0, 0, 24), fd, &params(key, 0, 0))
                        .unwrap();
                    assert_good(&r);
                })
                .unwrap()
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let r = server
        .client()
        .execute(&cdb_in(0, 8192), disk.fd(), &[])
        .unwrap();
    // 200 registrations and 200 unregistrations.
    assert_eq!(
        parse_read_keys(&r.data).unwrap(),
        (2 * N as u32, vec![], false)
    );
}

#[test]
fn the_client_refuses_more_data_than_it_asked_for() {
    // A fake server that answers a PR IN of allocation length 8 with 16
    // bytes: QEMU would abort, reservd's client reports invalid data.
    let path = unique_path("fake");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(&[0, 0, 0, 0]).unwrap();
        let mut buf = [0u8; 20];
        s.read_exact(&mut buf).unwrap();
        let mut r = vec![0, 0, 0, 0, 0, 0, 0, 16];
        r.extend_from_slice(&[0u8; 96 + 16]);
        s.write_all(&r).unwrap();
    });
    let disk = Disk::new();
    let mut c = reservd_client::client::Client::connect(&path).unwrap();
    let e = c.execute(&cdb_in(0, 8), disk.fd(), &[]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    fake.join().unwrap();
    let _ = std::fs::remove_file(&path);
}

/// A backend that fails marked commands with an error (no SCSI answer),
/// and records which connections it was told are gone.
struct Failing {
    inner: Emulated,
    seen: std::sync::Mutex<Vec<u64>>,
    gone: std::sync::Mutex<Vec<u64>>,
}

impl reservd_daemon::backend::PrBackend for Failing {
    fn execute(
        &self,
        cmd: &reservd_daemon::backend::Command<'_>,
    ) -> Result<reservd_proto::sense::Answer, reservd_daemon::backend::BackendError> {
        self.seen.lock().unwrap().push(cmd.nexus);
        if cmd.cdb[15] == HOLD {
            return Err(reservd_daemon::backend::BackendError::Service(
                "multipathd is not there".into(),
            ));
        }
        self.inner.execute(cmd)
    }

    fn disconnect(&self, nexus: u64) {
        self.gone.lock().unwrap().push(nexus);
    }
}

#[test]
fn the_backend_hears_of_every_connection_that_goes() {
    let backend = Arc::new(Failing {
        inner: Emulated::new(),
        seen: Default::default(),
        gone: Default::default(),
    });
    let server = TestServer::start(backend.clone(), test_config());
    let disk = Disk::new();
    let wait_gone = |n: u64| {
        let deadline = Instant::now() + TIMEOUT;
        while !backend.gone.lock().unwrap().contains(&n) {
            assert!(Instant::now() < deadline, "no disconnect for nexus {n}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    // A client that leaves.
    let mut c = server.client();
    assert_good(&c.execute(&cdb_in(0, 8192), disk.fd(), &[]).unwrap());
    drop(c);
    let first = *backend.seen.lock().unwrap().last().unwrap();
    wait_gone(first);
    // A backend failure closes the connection without an answer.
    let mut s = server.ready();
    let c = held(cdb_in(0, 8192));
    send(&s, &c, &[disk.fd()]).unwrap();
    assert_closed(&mut s);
    let second = *backend.seen.lock().unwrap().last().unwrap();
    assert_ne!(first, second);
    wait_gone(second);
    server.assert_serves();
}

/// A client that sends requests without reading the answers is not read
/// either once its answers can no longer be written: the server holds at
/// most one unsent answer per connection, whatever the client does. Once
/// the client reads, every request is answered, in order.
#[test]
fn a_client_that_does_not_read_is_not_read() {
    use reservd_client::client::send_with_fds;
    let (server, _) = TestServer::emulated();
    let disk = Disk::new();
    let mut s = server.ready();
    s.set_nonblocking(true).unwrap();
    let fill = |s: &UnixStream| {
        let mut sent = 0usize;
        loop {
            let c = cdb_in(prin_sa::READ_KEYS, 8192);
            match send_with_fds(s.as_fd(), &c, &[disk.fd()]) {
                Ok(n) => assert_eq!(n, 16),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return sent,
                Err(e) => panic!("{e}"),
            }
            sent += 1;
            assert!(sent < 100_000, "the server reads without end");
        }
    };
    // Fill the socket until the server has stopped taking requests for
    // three rounds in a row.
    let (mut sent, mut quiet) = (0, 0);
    for _ in 0..50 {
        let n = fill(&s);
        sent += n;
        quiet = if n == 0 { quiet + 1 } else { 0 };
        if quiet == 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        quiet, 3,
        "the server went on reading: {sent} requests taken"
    );
    server.assert_serves();

    s.set_nonblocking(false).unwrap();
    for _ in 0..sent {
        let a = read_answer(&mut s).unwrap();
        assert_eq!((a.status.0, a.data.len()), (0, 8));
    }
    // Nothing more: the next request gets the next answer.
    send(
        &s,
        &cdb_in(prin_sa::REPORT_CAPABILITIES, 8192),
        &[disk.fd()],
    )
    .unwrap();
    let a = read_answer(&mut s).unwrap();
    assert_eq!(a.data[..2], [0x00, 0x08]);
}
