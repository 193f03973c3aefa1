//! The server keeps no file descriptor from a request once it has been
//! answered, or from a connection once it is closed. This counts the
//! entries of /proc/self/fd around batches of requests to a server running
//! in this process, so it lives alone in its own test binary: no other
//! test may open or close files meanwhile.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use reservd_proto::cdb::{prin_sa, prout_sa};
use reservd_testkit::disks::*;
use reservd_testkit::frames::*;
use reservd_testkit::server::*;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[track_caller]
fn settle_at(want: usize) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let n = open_fds();
        if n == want {
            return;
        }
        assert!(Instant::now() < deadline, "{n} fds open, {want} before");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn no_fd_outlives_its_request_or_connection() {
    let (server, _) = TestServer::emulated();
    let disk = Disk::new();
    let ro = disk.read_only();
    let mut c = server.client();
    // Warm up: the server's first threads, lazily opened files.
    for _ in 0..3 {
        c.execute(&cdb_in(0, 8192), disk.fd(), &[]).unwrap();
    }
    let before = open_fds();

    for i in 1..=100u64 {
        let r = c
            .execute(&cdb_in(prin_sa::READ_FULL_STATUS, 8192), disk.fd(), &[])
            .unwrap();
        assert_eq!(r.status.0, 0);
        let r = c
            .execute(
                &cdb_out(prout_sa::REGISTER_AND_IGNORE, 0, 24),
                disk.fd(),
                &params(0, i, 0),
            )
            .unwrap();
        assert_eq!(r.status.0, 0);
        // CHECK CONDITION answers: read-only fd, bad service action.
        let r = c
            .execute(
                &cdb_out(prout_sa::REGISTER, 0, 24),
                ro.as_fd(),
                &params(0, i, 0),
            )
            .unwrap();
        assert_eq!(r.status.0, 2);
        let r = c.execute(&cdb_in(0x1f, 8192), disk.fd(), &[]).unwrap();
        assert_eq!(r.status.0, 2);
    }
    // Every fd was closed before its answer was sent.
    assert_eq!(open_fds(), before);

    // Connections closed by the server for protocol errors, with fds in
    // flight, and connections the client closes.
    for _ in 0..20 {
        let mut s = server.ready();
        send(&s, &cdb_in(0, 8193), &[disk.fd()]).unwrap();
        assert_closed(&mut s);
        let mut s = server.ready();
        send(&s, &cdb_in(0, 8192), &[disk.fd(), disk.fd()]).unwrap();
        assert_closed(&mut s);
        // More fds than a small control buffer holds: none may stay open.
        for n in [5, 10, 253] {
            let mut s = server.ready();
            send(&s, &cdb_in(0, 8192), &vec![disk.fd(); n]).unwrap();
            assert_closed(&mut s);
        }
        let s = server.ready();
        send(&s, &cdb_out(prout_sa::REGISTER, 0, 24), &[disk.fd()]).unwrap();
        drop(s);
    }
    settle_at(before);
    server.assert_serves();
    settle_at(before);
}
