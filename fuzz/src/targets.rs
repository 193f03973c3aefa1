//! The bodies of reservd's fuzz targets. Each takes arbitrary bytes, drives
//! one part of the daemon with them, and panics if an invariant breaks.
//! libFuzzer runs them (fuzz/fuzz_targets/, scripts/fuzz.sh); the test
//! suite replays the stored corpora through the same functions
//! (tests/fuzz_corpus.rs includes this file), so they must depend on
//! nothing but reservd's crates and std.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use reservd_client::client::send_with_fds;
use reservd_daemon::server::{Config, Server};
use reservd_proto::cdb::{pad16, transfer_length, PrInCdb, PrOutCdb};
use reservd_proto::mpath_xlate;
use reservd_proto::params::{parse_transport_ids, ProutParams, TransportId, MAX_TRANSPORT_IDS};
use reservd_proto::prin;
use reservd_proto::sense::{Answer, Status};
use reservd_proto::wire::{
    decode_response_header, encode_response, Decoder, Event, DATA_SIZE, FEATURE_CLEANUP,
    OP_CLEANUP, RESPONSE_HEADER_SIZE,
};
use reservd_testkit::disks::unlinked_file;
use reservd_testkit::emulated::Emulated;

/// Bytes as a stream of events: a control byte (low 5 bits + 1: how many
/// bytes follow, at most what the decoder wants; bits 5..6: how many fds
/// arrived with them), then the bytes. A busy decoder is completed, as the
/// server does once the answer is queued.
pub fn wire(data: &[u8]) {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let supported = if first & 1 != 0 { FEATURE_CLEANUP } else { 0 };
    let mut d = Decoder::new(supported);
    assert_eq!(d.server_hello(), supported.to_be_bytes());
    while let Some((&ctl, tail)) = rest.split_first() {
        if d.is_busy() {
            assert_eq!(d.wanted(), 0);
            d.complete();
        }
        let want = d.wanted();
        assert!(want > 0 && want <= DATA_SIZE, "wanted {want}");
        let n = ((ctl & 0x1f) as usize + 1).min(want).min(tail.len());
        let fds = ((ctl >> 5) & 3) as usize;
        let (chunk, after) = tail.split_at(n);
        rest = after;
        if chunk.is_empty() {
            assert!(d.eof() != reservd_proto::wire::ProtoError::Pipelined);
            return;
        }
        match d.feed(chunk, fds) {
            Err(_) => return,
            Ok(None) => assert!(!d.is_busy()),
            Ok(Some(Event::Negotiated(f))) => assert_eq!(f & !supported, 0),
            Ok(Some(Event::Request(req))) => {
                assert!(d.is_busy() && d.at_boundary());
                let op = req.opcode();
                assert!(
                    op == 0x5e || op == 0x5f || (op == OP_CLEANUP && supported != 0),
                    "opcode {op:#x} accepted"
                );
                // CLEANUP has no transfer length; PR IN/OUT at most 8192.
                let len = transfer_length(&req.cdb);
                assert!(op == OP_CLEANUP || len <= DATA_SIZE);
                let expect = if op == 0x5f { len } else { 0 };
                assert_eq!(req.params.len(), expect);
                // The answer never carries more than the client accepts.
                let mut answer = Answer::good(chunk.repeat(DATA_SIZE / chunk.len() + 1));
                if ctl & 0x80 != 0 {
                    answer.status = Status::CHECK_CONDITION;
                }
                let out = encode_response(&req, &answer);
                let (_, len) =
                    decode_response_header(out[..RESPONSE_HEADER_SIZE].try_into().unwrap());
                assert_eq!(out.len(), RESPONSE_HEADER_SIZE + len);
                assert!(len <= req.max_response_len());
                if answer.status != Status::GOOD {
                    assert_eq!(len, 0);
                }
            }
        }
    }
}

/// PR IN and PR OUT CDBs: parse, encode, parse again.
pub fn cdb(data: &[u8]) {
    if let Ok(c) = PrInCdb::parse(data) {
        assert!(c.service_action < 0x20);
        assert_eq!(PrInCdb::parse(&c.encode()), Ok(c));
    }
    if let Ok(c) = PrOutCdb::parse(data) {
        assert!(c.scope < 0x10 && c.pr_type < 0x10);
        assert_eq!(PrOutCdb::parse(&c.encode()), Ok(c));
    }
    let c = pad16(data);
    assert!(transfer_length(&c) <= 0xffff);
    let _ = mpath_xlate::prin_service_action(&c);
}

/// PR OUT parameter lists and TransportIDs: what parses re-encodes to
/// something that parses to the same value.
pub fn params(data: &[u8]) {
    let Some((&sa, p)) = data.split_first() else {
        return;
    };
    let sa = sa & 0x1f;
    if let Ok(pp) = ProutParams::parse(sa, p) {
        let again = ProutParams::parse(sa, &pp.encode_for(sa)).expect("re-encoded list parses");
        assert_eq!(again, pp);
    }
    if let Ok((tid, used)) = TransportId::parse(p) {
        assert!(used <= p.len() && used > 0);
        let enc = tid.encode();
        let (again, n) = TransportId::parse(&enc).expect("re-encoded TransportID parses");
        assert_eq!(again, tid);
        assert_eq!(n, enc.len());
    }
    if let Ok(ids) = parse_transport_ids(p) {
        // At most 32, each at least 8 bytes, together the whole list.
        assert!(ids.len() <= MAX_TRANSPORT_IDS);
        assert!(ids.iter().all(|(_, b)| b.len() >= 8));
        assert_eq!(
            ids.iter().map(|(_, b)| *b).collect::<Vec<_>>().concat(),
            p[4..]
        );
    }
}

/// The translation to and from libmpathpersist's structures: the first 16
/// bytes are a CDB, the rest PR OUT parameters (and, for PR IN, the buffer
/// the library filled).
pub fn mpath_xlate(data: &[u8]) {
    let (c, rest) = data.split_at(data.len().min(16));
    let c = pad16(c);
    let params = &rest[..rest.len().min(DATA_SIZE)];
    if let Ok(r) = mpath_xlate::prout_request(&c, params) {
        assert!(r.transport_ids.len() <= MAX_TRANSPORT_IDS);
        assert!(params.len() >= mpath_xlate::PROUT_HEADER_SIZE);
    }
    let sa = c[1] & 0x1f;
    if sa > 3 {
        return;
    }
    let mut resp = vec![0u8; mpath_xlate::prin_buffer_size(sa)];
    let n = rest.len().min(resp.len());
    resp[..n].copy_from_slice(&rest[..n]);
    let Ok(out) = mpath_xlate::prin_data(sa, &resp) else {
        return;
    };
    // What reservd reports decodes as SPC-4 PR IN data of its kind.
    match sa {
        0 => {
            prin::parse_read_keys(&out).expect("READ KEYS data");
        }
        1 => {
            prin::parse_read_reservation(&out).expect("READ RESERVATION data");
        }
        2 => {
            prin::parse_report_capabilities(&out).expect("REPORT CAPABILITIES data");
        }
        _ => {
            let (_, descs) = prin::parse_read_full_status(&out).expect("READ FULL STATUS data");
            for d in &descs {
                let _ = prin::descriptor_transport_id(d);
            }
        }
    }
}

/// PR IN data as a device (or a broken array) might return it.
pub fn prin(data: &[u8]) {
    if let Ok((_, keys, truncated)) = prin::parse_read_keys(data) {
        assert!(keys.len() * 8 + 8 <= data.len() || truncated);
    }
    let _ = prin::parse_read_reservation(data);
    let _ = prin::parse_report_capabilities(data);
    if let Ok((_, descs)) = prin::parse_read_full_status(data) {
        for d in &descs {
            let _ = prin::descriptor_transport_id(d);
        }
    }
}

/// A server running in this process on the emulated target, shared by all
/// inputs, and the file its clients pass as their disk. The socket has an
/// abstract name and the file is unlinked at once: nothing is left behind
/// when the process exits (libFuzzer ends it with `exit`).
struct Harness {
    addr: SocketAddr,
    disk: std::fs::File,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let name = format!("reservd-fuzz-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let listener = UnixListener::bind_addr(&addr).expect("bind");
        let config = Config {
            features: FEATURE_CLEANUP,
            drain_timeout: Duration::from_secs(1),
            ..Config::default()
        };
        let server = Server::new(listener, Arc::new(Emulated::new()), config).expect("server");
        std::thread::spawn(move || server.run());
        let disk = unlinked_file("fuzz-disk");
        Harness { addr, disk }
    })
}

/// How long the server may take to answer and close, per connection.
const SERVER_LIMIT: Duration = Duration::from_secs(5);

/// Up to three clients send arbitrary bytes with 0 to 3 fds, interleaved;
/// then each half-closes and reads to the end. The server must close every
/// connection, send nothing but its hello and well-formed answers, and
/// still serve a new client afterwards.
///
/// Ops: `0b00cc_kkff`-style control bytes: bits 0..1 pick the connection,
/// bit 2 closes it abruptly, bits 3..4 the fd count, and the next byte
/// (+1) how many of the following bytes to send.
pub fn server(data: &[u8]) {
    let h = harness();
    let mut conns: [Option<UnixStream>; 3] = [None, None, None];
    let mut rest = data;
    while let [ctl, len, tail @ ..] = rest {
        let k = (*ctl & 3) as usize % 3;
        let n = (*len as usize + 1).min(tail.len());
        let (chunk, after) = tail.split_at(n);
        rest = after;
        if ctl & 4 != 0 {
            conns[k] = None;
            continue;
        }
        let s = conns[k].get_or_insert_with(|| connect(&h.addr));
        let fds: Vec<BorrowedFd<'_>> = vec![h.disk.as_fd(); ((ctl >> 3) & 3) as usize];
        // A full socket (the server waits for its answer to be read) or a
        // closed one only cuts the input short.
        let _ = send_with_fds(s.as_fd(), chunk, &fds);
    }
    for s in conns.iter_mut().flatten() {
        let _ = s.shutdown(std::net::Shutdown::Write);
        check_answers(s);
    }
    // Still serving.
    let mut s = connect(&h.addr);
    s.set_nonblocking(false).unwrap();
    let mut frame = [0u8; 4].to_vec();
    frame.extend_from_slice(&pad16(&[0x5e, 0, 0, 0, 0, 0, 0, 0x20, 0]));
    send_with_fds(s.as_fd(), &frame[..4], &[]).unwrap();
    send_with_fds(s.as_fd(), &frame[4..], &[h.disk.as_fd()]).unwrap();
    let mut hello = [0u8; 4];
    s.read_exact(&mut hello).unwrap();
    let mut hdr = [0u8; RESPONSE_HEADER_SIZE];
    s.read_exact(&mut hdr).expect("a new client is answered");
    assert_eq!(decode_response_header(&hdr).0.status, Status::GOOD);
}

fn connect(addr: &SocketAddr) -> UnixStream {
    let s = UnixStream::connect_addr(addr).expect("connect");
    s.set_nonblocking(true).unwrap();
    s.set_read_timeout(Some(SERVER_LIMIT)).unwrap();
    s
}

/// Read to EOF: the 4-byte hello, then whole answers only.
fn check_answers(s: &mut UnixStream) {
    s.set_nonblocking(false).unwrap();
    let mut all = Vec::new();
    let end = Instant::now() + SERVER_LIMIT;
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("the server did not close a half-closed connection: {e}"),
        }
        assert!(Instant::now() < end, "the server kept a connection open");
    }
    assert!(all.len() >= 4, "no hello");
    assert_eq!(all[..4], FEATURE_CLEANUP.to_be_bytes());
    let mut at = 4;
    while at < all.len() {
        assert!(at + RESPONSE_HEADER_SIZE <= all.len(), "cut answer header");
        let (answer, len) =
            decode_response_header(all[at..at + RESPONSE_HEADER_SIZE].try_into().unwrap());
        assert!(len <= DATA_SIZE);
        assert!(
            len == 0 || answer.status == Status::GOOD,
            "data with status {}",
            answer.status.0
        );
        at += RESPONSE_HEADER_SIZE + len;
        assert!(at <= all.len(), "cut answer data");
    }
}
