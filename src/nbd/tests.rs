//! Tests of the NBD server: the state machine fed by hand, our client over real sockets, and
//! real peers (qemu-io, qemu-img, nbdinfo, nbdcopy) against the host driver.

use super::client::{
    Client, ClientOptions, go_option_data, greet, meta_context_option_data, read_option_reply,
    send_option,
};
use super::host::HostServer;
use super::proto::*;
use super::*;
use crate::disk::{Allocation, DiskError, Extent, VirtualDisk, check_request};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command as Process;

const BLOCK: u64 = 4096;

/// A disk in memory that tracks allocation per 4 KiB block, like a sparse image: unwritten
/// blocks are holes, write-zeroes with unmap makes holes, without it zero blocks.
#[derive(Clone)]
pub(crate) struct TrackDisk {
    data: Vec<u8>,
    state: Vec<Allocation>,
    read_only: bool,
    pub(crate) flushes: u64,
    /// Reads at or past this offset fail with an I/O error.
    pub(crate) fail_reads_from: u64,
}

impl TrackDisk {
    pub(crate) fn new(size: u64) -> Self {
        TrackDisk {
            data: vec![0; size as usize],
            state: vec![Allocation::Hole; size.div_ceil(BLOCK) as usize],
            read_only: false,
            flushes: 0,
            fail_reads_from: u64::MAX,
        }
    }

    fn mark(&mut self, offset: u64, len: u64, kind: Allocation) {
        if len == 0 {
            return;
        }
        let first = offset / BLOCK;
        let last = (offset + len - 1) / BLOCK;
        for b in first..=last {
            let whole = b * BLOCK >= offset && (b + 1) * BLOCK <= offset + len;
            let s = &mut self.state[b as usize];
            *s = match (kind, whole) {
                (Allocation::Data, _) => Allocation::Data,
                (k, true) => k,
                // A partial zeroing of a block keeps it allocated.
                (_, false) if *s == Allocation::Data => Allocation::Data,
                (k, false) => k,
            };
        }
    }
}

impl VirtualDisk for TrackDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_request(offset, buf.len() as u64, self.size())?;
        if offset + buf.len() as u64 > self.fail_reads_from {
            return Err(DiskError::Device(crate::block::BlockError::Io));
        }
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        check_request(offset, buf.len() as u64, self.size())?;
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        self.mark(offset, buf.len() as u64, Allocation::Data);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.flushes += 1;
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        check_request(offset, len, self.size())?;
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.data[offset as usize..(offset + len) as usize].fill(0);
        let kind = if may_unmap {
            Allocation::Hole
        } else {
            Allocation::Zero
        };
        self.mark(offset, len, kind);
        Ok(())
    }
    fn block_status(&mut self, offset: u64, len: u64) -> Result<Extent, DiskError> {
        check_request(offset, len, self.size())?;
        let b = offset / BLOCK;
        let kind = self.state[b as usize];
        let mut end = ((b + 1) * BLOCK).min(offset + len);
        // One block at a time when asked in the middle; runs of the same kind otherwise.
        while end < offset + len && self.state[(end / BLOCK) as usize] == kind {
            end = ((end / BLOCK + 1) * BLOCK).min(offset + len);
        }
        Ok(Extent {
            len: end - offset,
            kind,
        })
    }
}

// ---- driving the state machine by hand ---------------------------------------------------

/// Runs `input` through a connection, `chunk` bytes at a time; returns the output.
fn run(
    conn: &mut Connection,
    disk: &mut TrackDisk,
    stats: &mut NbdStats,
    input: &[u8],
    chunk: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        if pos < input.len() {
            let end = (pos + chunk).min(input.len());
            pos += conn.receive(&input[pos..end]);
        }
        let progressed = conn.process(disk, stats);
        // Drain slowly too, to exercise partial sends.
        let n = conn.output().len().min(chunk.max(7));
        out.extend_from_slice(&conn.output()[..n]);
        conn.consume_output(n);
        if conn.is_closed() || (!progressed && pos >= input.len() && conn.output().is_empty()) {
            break;
        }
    }
    out
}

/// A client option: `IHAVEOPT`, option `opt`, and its `data`.
fn opt(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// What a client sends to enter transmission the short way: its flags (fixed newstyle, no
/// zeroes) and `NBD_OPT_EXPORT_NAME` for `name`.
fn export_name_handshake(name: &[u8]) -> Vec<u8> {
    let mut s = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    s.extend(opt(OPT_EXPORT_NAME, name));
    s
}

/// A request header (its payload, if any, follows separately).
fn req(kind: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    Request {
        flags,
        kind,
        handle,
        offset,
        len,
    }
    .encode()
    .to_vec()
}

/// Splits option replies out of `out` (after the greeting): (option, type, data).
fn option_replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while out.len() >= 20 && be64(out) == OPT_REPLY_MAGIC {
        let len = be32(&out[16..]) as usize;
        v.push((
            be32(&out[8..]),
            be32(&out[12..]),
            out[20..20 + len].to_vec(),
        ));
        out = &out[20 + len..];
    }
    v
}

/// A whole session: handshake with structured replies and base:allocation, GO, a few
/// commands, DISC.
fn session_script() -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    s.extend(opt(0x1234, b"whatever"));
    s.extend(opt(OPT_LIST, &[]));
    s.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    s.extend(opt(
        OPT_SET_META_CONTEXT,
        &meta_context_option_data("disk", &["base:allocation"]),
    ));
    s.extend(opt(
        OPT_GO,
        &go_option_data("disk", &[INFO_NAME, INFO_BLOCK_SIZE]),
    ));
    s.extend(req(CMD_WRITE, 0, 1, 8192, 5000));
    s.extend((0..5000u32).map(|i| (i % 251) as u8));
    s.extend(req(CMD_READ, 0, 2, 8000, 6000));
    s.extend(req(CMD_BLOCK_STATUS, 0, 3, 0, 65536));
    s.extend(req(CMD_FLUSH, 0, 4, 0, 0));
    s.extend(req(CMD_DISC, 0, 5, 0, 0));
    s
}

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let conn = Connection::new(&ServerConfig::default());
    let g = conn.output();
    assert_eq!(g.len(), GREETING_LEN);
    assert_eq!(be64(g), NBDMAGIC);
    assert_eq!(be64(&g[8..]), IHAVEOPT);
    assert_eq!(be16(&g[16..]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

#[test]
fn byte_at_a_time_gives_the_same_bytes_as_all_at_once() {
    let script = session_script();
    let mut outs = Vec::new();
    for chunk in [1, 3, 17, 4096, usize::MAX / 2] {
        let mut disk = TrackDisk::new(1 << 20);
        let mut stats = NbdStats::default();
        let mut conn = Connection::new(&ServerConfig::default());
        let out = run(&mut conn, &mut disk, &mut stats, &script, chunk);
        assert!(conn.is_closed(), "DISC closes (chunk {chunk})");
        assert_eq!(stats.connections_active, 0);
        assert_eq!(stats.connections_total, 1);
        assert_eq!(stats.requests_of(Command::Write), 1);
        assert_eq!(stats.requests_of(Command::Read), 1);
        assert_eq!(stats.bytes_written, 5000);
        assert_eq!(stats.bytes_read, 6000);
        assert_eq!(stats.errors_total(), 0);
        outs.push(out);
    }
    for o in &outs[1..] {
        assert_eq!(o, &outs[0]);
    }
    // The option replies: UNSUP for the unknown option, then LIST, then the rest.
    let replies = option_replies(&outs[0][GREETING_LEN..]);
    assert_eq!((replies[0].0, replies[0].1), (0x1234, REP_ERR_UNSUP));
    assert_eq!((replies[1].0, replies[1].1), (OPT_LIST, REP_SERVER));
    assert_eq!(&replies[1].2[4..], b"disk");
    assert_eq!((replies[2].0, replies[2].1), (OPT_LIST, REP_ACK));
    assert_eq!(replies[3].1, REP_ACK, "structured replies");
    assert_eq!(replies[4].1, REP_META_CONTEXT);
    assert_eq!(&replies[4].2[4..], b"base:allocation");
    assert_eq!(replies[5].1, REP_ACK);
    let infos: Vec<_> = replies[6..].iter().filter(|r| r.1 == REP_INFO).collect();
    let export = infos.iter().find(|r| be16(&r.2) == INFO_EXPORT).unwrap();
    assert_eq!(be64(&export.2[2..]), 1 << 20);
    let flags = be16(&export.2[10..]);
    assert_eq!(flags & TFLAG_HAS_FLAGS, TFLAG_HAS_FLAGS);
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    for f in [
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
    ] {
        assert_ne!(flags & f, 0);
    }
    let name = infos.iter().find(|r| be16(&r.2) == INFO_NAME).unwrap();
    assert_eq!(&name.2[2..], b"disk");
    let bs = infos
        .iter()
        .find(|r| be16(&r.2) == INFO_BLOCK_SIZE)
        .unwrap();
    assert_eq!(
        (be32(&bs.2[2..]), be32(&bs.2[6..]), be32(&bs.2[10..])),
        (1, 4096, 32 << 20)
    );
}

#[test]
fn export_name_with_and_without_zeroes() {
    for (cflags, extra) in [
        (FLAG_C_FIXED_NEWSTYLE, 124),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0),
    ] {
        let mut disk = TrackDisk::new(65536);
        let mut stats = NbdStats::default();
        let mut conn = Connection::new(&ServerConfig::default());
        let mut s = cflags.to_be_bytes().to_vec();
        s.extend(opt(OPT_EXPORT_NAME, b""));
        let out = run(&mut conn, &mut disk, &mut stats, &s, 64);
        assert_eq!(out.len(), GREETING_LEN + 10 + extra);
        assert_eq!(be64(&out[GREETING_LEN..]), 65536);
        assert!(conn.in_transmission());
        assert_eq!(stats.sessions_total, 1);
    }
}

#[test]
fn protocol_violations_close_the_connection() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown client flag", 0x80u32.to_be_bytes().to_vec()),
        ("bad option magic", {
            let mut s = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            s.extend_from_slice(b"NOTMAGIC\0\0\0\x07\0\0\0\0");
            s
        }),
        ("unknown export via EXPORT_NAME", {
            let mut s = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            s.extend(opt(OPT_EXPORT_NAME, b"nope"));
            s
        }),
        ("bad request magic", {
            let mut s = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            s.extend(opt(OPT_EXPORT_NAME, b"disk"));
            s.extend_from_slice(&[0xff; REQUEST_LEN]);
            s
        }),
    ];
    for (what, script) in cases {
        let mut disk = TrackDisk::new(65536);
        let mut stats = NbdStats::default();
        let mut conn = Connection::new(&ServerConfig::default());
        run(&mut conn, &mut disk, &mut stats, &script, 5);
        assert!(conn.is_closed(), "{what}");
        assert_eq!(stats.protocol_errors, 1, "{what}");
        assert_eq!(stats.connections_active, 0, "{what}");
        // After closing, input is swallowed and nothing more is produced.
        assert_eq!(conn.receive(b"more"), 4);
        assert!(!conn.process(&mut disk, &mut stats));
    }
}

#[test]
fn bad_options_get_errors_and_haggling_goes_on() {
    let mut s = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    s.extend(opt(OPT_LIST, b"x"));
    s.extend(opt(OPT_GO, b"\0\0\0\x10short"));
    s.extend(opt(OPT_INFO, &go_option_data("other", &[])));
    s.extend(opt(
        OPT_SET_META_CONTEXT,
        &meta_context_option_data("disk", &["base:allocation"]),
    ));
    s.extend(opt(OPT_STARTTLS, &[]));
    s.extend(opt(77, &vec![1u8; MAX_OPTION_LEN + 10]));
    s.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    s.extend(opt(
        OPT_LIST_META_CONTEXT,
        &meta_context_option_data("disk", &[]),
    ));
    s.extend(opt(
        OPT_LIST_META_CONTEXT,
        &meta_context_option_data("disk", &["x-other:thing"]),
    ));
    s.extend(opt(OPT_ABORT, &[]));
    let mut disk = TrackDisk::new(65536);
    let mut stats = NbdStats::default();
    let mut conn = Connection::new(&ServerConfig::default());
    let out = run(&mut conn, &mut disk, &mut stats, &s, 1000);
    let kinds: Vec<u32> = option_replies(&out[GREETING_LEN..])
        .iter()
        .map(|r| r.1)
        .collect();
    assert_eq!(
        kinds,
        vec![
            REP_ERR_INVALID,
            REP_ERR_INVALID,
            REP_ERR_UNKNOWN,
            REP_ERR_INVALID, // meta context before structured replies
            REP_ERR_UNSUP,
            REP_ERR_TOO_BIG,
            REP_ACK,
            REP_META_CONTEXT,
            REP_ACK,
            REP_ACK, // no context matches x-other
            REP_ACK, // abort
        ]
    );
    assert!(conn.is_closed());
    assert_eq!(stats.protocol_errors, 0);
}

#[test]
fn read_only_export_refuses_writes() {
    let mut disk = TrackDisk::new(65536);
    let mut stats = NbdStats::default();
    let config = ServerConfig {
        read_only: true,
        ..ServerConfig::default()
    };
    let mut conn = Connection::new(&config);
    let mut s = export_name_handshake(b"disk");
    s.extend(req(CMD_WRITE, 0, 7, 0, 4));
    s.extend_from_slice(b"abcd");
    s.extend(req(CMD_TRIM, 0, 8, 0, 4096));
    s.extend(req(CMD_WRITE_ZEROES, 0, 9, 0, 4096));
    s.extend(req(CMD_READ, 0, 10, 0, 4));
    let out = run(&mut conn, &mut disk, &mut stats, &s, 3);
    let flags = be16(&out[GREETING_LEN + 8..]);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    let mut r = &out[GREETING_LEN + 10..];
    for handle in [7, 8, 9] {
        assert_eq!(be32(r), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&r[4..]), 1, "EPERM");
        assert_eq!(be64(&r[8..]), handle);
        r = &r[16..];
    }
    assert_eq!(be32(&r[4..]), 0, "reads still work");
    assert_eq!(r.len(), 16 + 4);
    assert_eq!(stats.errors_of(NbdError::Perm), 3);
    assert_eq!(disk.data[..4], [0; 4]);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
    /// Garbage after any prefix of a valid session never panics, and the buffers stay bounded.
    #[test]
    fn random_input_never_panics(cut in 0usize..400, garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), chunk in 1usize..64) {
        let mut script = session_script();
        script.truncate(cut.min(script.len()));
        script.extend(garbage);
        let mut disk = TrackDisk::new(1 << 20);
        let mut stats = NbdStats::default();
        let config = ServerConfig { io_chunk: 4096, ..ServerConfig::default() };
        let mut conn = Connection::new(&config);
        run(&mut conn, &mut disk, &mut stats, &script, chunk);
        proptest::prop_assert!(conn.input_space() > 0);
    }

    /// Random requests after a valid handshake: never a panic, every request answered
    /// (except DISC), and the connection only closes on a bad magic or DISC.
    #[test]
    fn random_requests_are_answered(reqs in proptest::collection::vec((0u16..10, 0u16..64, 0u64..(3 << 20), 0u32..(3 << 20)), 1..20)) {
        let mut s = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
        s.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        s.extend(opt(OPT_SET_META_CONTEXT, &meta_context_option_data("disk", &["base:allocation"])));
        s.extend(opt(OPT_GO, &go_option_data("", &[])));
        let mut expected = 0;
        for (i, (kind, flags, offset, len)) in reqs.iter().enumerate() {
            if *kind == CMD_DISC { continue; }
            let len = if *kind == CMD_WRITE { len % 70000 } else { *len };
            s.extend(req(*kind, *flags, i as u64, *offset, len));
            if *kind == CMD_WRITE { s.extend(vec![0x5a; len as usize]); }
            expected += 1;
        }
        let mut disk = TrackDisk::new(1 << 20);
        let mut stats = NbdStats::default();
        let config = ServerConfig { io_chunk: 8192, max_payload: 65536, ..ServerConfig::default() };
        let mut conn = Connection::new(&config);
        run(&mut conn, &mut disk, &mut stats, &s, 1000);
        proptest::prop_assert!(!conn.is_closing());
        let answered: u64 = stats.requests.iter().sum();
        proptest::prop_assert_eq!(answered, expected);
    }
}

// ---- our client over real sockets ----------------------------------------------------------

/// `len` bytes that depend on their position and on `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn client_round_trip_errors_and_block_status() {
    let server = HostServer::start(TrackDisk::new(8 << 20), ServerConfig::named("disk")).unwrap();
    let mut c = Client::connect(server.addr, "disk").unwrap();
    assert!(c.structured() && c.base_allocation());
    assert_eq!(c.size(), 8 << 20);
    assert_ne!(c.flags() & TFLAG_CAN_MULTI_CONN, 0);

    // Writes across chunk boundaries, unaligned, then read back in one and in pieces.
    let data = pattern(3 << 20, 7);
    assert_eq!(c.write(12345, &data, true).unwrap(), 0);
    let mut back = vec![0u8; data.len()];
    assert_eq!(c.read(12345, &mut back).unwrap(), 0);
    assert!(back == data);
    let mut piece = vec![0u8; 1000];
    assert_eq!(c.read(12345 + 1_000_000, &mut piece).unwrap(), 0);
    assert_eq!(piece[..], data[1_000_000..1_001_000]);

    // Errors keep the connection.
    let mut big = vec![0u8; 10];
    assert_eq!(
        c.read((8 << 20) - 5, &mut big).unwrap(),
        22,
        "read past the end: EINVAL"
    );
    assert_eq!(
        c.write((8 << 20) - 5, &big, false).unwrap(),
        28,
        "write past the end: ENOSPC"
    );
    assert_eq!(
        c.write_zeroes(0, 4096, CMD_FLAG_FAST_ZERO).unwrap(),
        22,
        "FAST_ZERO not offered"
    );
    assert_eq!(c.block_status(0, 0, false).unwrap().error, 22);
    c.send(99, 0, 0, 0, &[]).unwrap();
    assert_eq!(
        c.recv(&mut Vec::new()).unwrap().error,
        22,
        "unknown command"
    );
    // A write larger than the maximum payload: its payload is read and dropped.
    let huge = vec![1u8; (32 << 20) + 1];
    assert_eq!(c.write(0, &huge, false).unwrap(), 22);
    assert_eq!(c.read(12345, &mut piece).unwrap(), 0);
    assert_eq!(piece[..], data[..1000]);

    // Allocation: holes before 12345's block, data over the write, holes after.
    let r = c.block_status(0, 8 << 20, false).unwrap();
    assert_eq!(r.error, 0);
    let start = 12345 / 4096 * 4096;
    let end = (12345 + data.len() as u32).div_ceil(4096) * 4096;
    assert_eq!(
        r.extents,
        vec![
            (start, STATE_HOLE | STATE_ZERO),
            (end - start, 0),
            ((8 << 20) - end, STATE_HOLE | STATE_ZERO)
        ]
    );
    assert_eq!(
        c.block_status(0, 8 << 20, true).unwrap().extents,
        vec![(start, 3)]
    );
    assert_eq!(
        c.write_zeroes(1 << 20, 1 << 20, CMD_FLAG_NO_HOLE).unwrap(),
        0
    );
    assert_eq!(c.trim(2 << 20, 65536).unwrap(), 0);
    let r = c.block_status(1 << 20, 2 << 20, false).unwrap();
    assert_eq!(
        r.extents,
        vec![
            (1 << 20, STATE_ZERO),
            (65536, STATE_ZERO | STATE_HOLE),
            ((1 << 20) - 65536, 0)
        ]
    );
    assert_eq!(c.flush().unwrap(), 0);
    c.disconnect().unwrap();

    let st = server.stats();
    assert_eq!(st.errors_of(NbdError::Invalid), 5);
    assert_eq!(st.errors_of(NbdError::NoSpace), 1);
    assert_eq!(st.bytes_written, data.len() as u64);
    assert_eq!(st.requests_of(Command::Disconnect), 1);
    // The flush and the FUA write both reached the disk.
    assert_eq!(server.disk.lock().unwrap().flushes, 2);
}

#[test]
fn simple_replies_and_read_errors() {
    let mut disk = TrackDisk::new(4 << 20);
    disk.fail_reads_from = 3 << 20;
    let config = ServerConfig {
        io_chunk: 65536,
        ..ServerConfig::named("disk")
    };
    let server = HostServer::start(disk, config).unwrap();
    // Structured: an error chunk, connection kept.
    let mut c = Client::connect(server.addr, "disk").unwrap();
    let mut buf = vec![0u8; 200_000];
    assert_eq!(c.read((3 << 20) - 100_000, &mut buf).unwrap(), 5, "EIO");
    assert_eq!(c.read(0, &mut buf).unwrap(), 0);
    c.disconnect().unwrap();
    // Simple replies: an error before any data is an error reply...
    let opts = ClientOptions {
        structured: false,
        ..ClientOptions::new("disk")
    };
    let mut c = Client::connect_with(server.addr, &opts).unwrap();
    assert!(!c.structured());
    assert_eq!(
        c.block_status(0, 4096, false).unwrap().error,
        22,
        "no context negotiated"
    );
    assert_eq!(c.read(3 << 20, &mut buf[..100]).unwrap(), 5);
    assert_eq!(c.read(0, &mut buf).unwrap(), 0);
    // ...but after the header went out only a hard disconnect is left.
    c.send(CMD_READ, 0, (3 << 20) - 100_000, 200_000, &[])
        .unwrap();
    assert!(c.recv(&mut Vec::new()).is_err());
    assert_eq!(server.stats().errors_of(NbdError::Io), 3);
}

#[test]
fn many_clients_pipelined_share_one_disk() {
    let server = HostServer::start(TrackDisk::new(16 << 20), ServerConfig::named("disk")).unwrap();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let mut c = Client::connect(addr, "disk").unwrap();
                let base = u64::from(t) * (4 << 20);
                let data = pattern(4 << 20, t);
                // 64 writes of 64 KiB in flight at once.
                for i in 0..64u64 {
                    let off = i as usize * 65536;
                    c.send(
                        CMD_WRITE,
                        0,
                        base + off as u64,
                        65536,
                        &data[off..off + 65536],
                    )
                    .unwrap();
                }
                for _ in 0..64 {
                    assert_eq!(c.recv(&mut Vec::new()).unwrap().error, 0);
                }
                let mut back = vec![0u8; 4 << 20];
                assert_eq!(c.read(base, &mut back).unwrap(), 0);
                assert!(back == data);
                c.disconnect().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let st = server.stats();
    assert_eq!(st.connections_total, 4);
    assert_eq!(st.connections_active, 0);
    assert_eq!(st.requests_of(Command::Write), 256);
}

// ---- real peers ----------------------------------------------------------------------------

/// Runs a host tool; fails naming the Debian package when it is missing.
fn tool(name: &str, package: &str, args: &[&str]) -> std::process::Output {
    let out = Process::new(name).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `{name}` ({e}): install the Debian package `{package}` (apt-get install {package})")
    });
    assert!(
        out.status.success(),
        "`{name} {}` failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// qemu-io on the raw export at `uri`, one `-c` per command; fails when any command fails.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let out = tool("qemu-io", "qemu-utils", &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.contains("failed"), "{text}");
    text
}

#[test]
fn qemu_io_and_qemu_img_convert() {
    let server = HostServer::start(TrackDisk::new(16 << 20), ServerConfig::named("disk")).unwrap();
    let uri = server.uri("disk");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 5M 3M",
            "write -P 0x11 12345 777",
            "write -z 6M 512k",
            "write -z -u 7M 64k",
            "aio_write -P 0x22 10M 64k",
            "aio_write -P 0x23 11M 64k",
            "aio_flush",
            "flush",
        ],
    );
    let text = qemu_io(
        &uri,
        &[
            "read -P 0xab 0 12345",
            "read -P 0x11 12345 777",
            "read -P 0xab 13122 1035454",
            "read -P 0xcd 5M 1M",
            "read -P 0 6M 512k",
            "read -P 0 7M 64k",
            "read -P 0xcd 7405568 983040",
            "read -P 0x22 10M 64k",
            "read -P 0x23 11M 64k",
            "read -P 0 12M 4M",
        ],
    );
    assert_eq!(text.matches("read ").count(), 10, "{text}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    tool(
        "qemu-img",
        "qemu-utils",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            out.to_str().unwrap(),
        ],
    );
    let got = std::fs::read(&out).unwrap();
    let expected = server.disk.lock().unwrap().data.clone();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "qemu-img convert gives the disk's bytes");
    assert_eq!(expected[5 << 20], 0xcd);
    let st = server.stats();
    assert_eq!(st.errors_total(), 0);
    assert!(
        st.requests_of(Command::BlockStatus) > 0,
        "qemu-img convert asks for the map"
    );
}

#[test]
fn nbdinfo_list_and_map() {
    let config = ServerConfig {
        description: "test disk".into(),
        ..ServerConfig::named("disk")
    };
    let server = HostServer::start(TrackDisk::new(8 << 20), config).unwrap();
    {
        let mut c = Client::connect(server.addr, "disk").unwrap();
        assert_eq!(c.write(1 << 20, &pattern(1 << 20, 1), false).unwrap(), 0);
        assert_eq!(
            c.write_zeroes(4 << 20, 1 << 20, CMD_FLAG_NO_HOLE).unwrap(),
            0
        );
        c.disconnect().unwrap();
    }
    let uri = server.uri("disk");
    let list = tool(
        "nbdinfo",
        "libnbd-bin",
        &["--list", &format!("nbd://{}", server.addr)],
    );
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("export=\"disk\""), "{list}");
    assert!(list.contains("test disk"), "{list}");
    assert!(list.contains("export-size: 8388608"), "{list}");

    let map = tool("nbdinfo", "libnbd-bin", &["--map", &uri]);
    let map = String::from_utf8_lossy(&map.stdout);
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let rows: Vec<(u64, u64, u32)> = rows
        .iter()
        .map(|r| {
            (
                r[0].parse().unwrap(),
                r[1].parse().unwrap(),
                r[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, 1 << 20, 3),
            (1 << 20, 1 << 20, 0),
            (2 << 20, 2 << 20, 3),
            (4 << 20, 1 << 20, 2),
            (5 << 20, 3 << 20, 3),
        ],
        "{map}"
    );
}

#[test]
fn nbdcopy_in_and_out() {
    let server = HostServer::start(TrackDisk::new(24 << 20), ServerConfig::named("disk")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.raw");
    let mut data = pattern(24 << 20, 3);
    data[8 << 20..10 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    let uri = server.uri("disk");
    tool("nbdcopy", "libnbd-bin", &[src.to_str().unwrap(), &uri]);
    assert!(server.disk.lock().unwrap().data == data, "nbdcopy in");
    let dst = dir.path().join("out.raw");
    tool("nbdcopy", "libnbd-bin", &[&uri, dst.to_str().unwrap()]);
    assert!(std::fs::read(&dst).unwrap() == data, "nbdcopy out");
    assert_eq!(server.stats().errors_total(), 0);
}

#[test]
fn malformed_clients_do_not_stop_others() {
    let server = HostServer::start(TrackDisk::new(4 << 20), ServerConfig::named("disk")).unwrap();
    let mut good = Client::connect(server.addr, "disk").unwrap();
    assert_eq!(good.write(0, b"still here", false).unwrap(), 0);

    // Garbage instead of client flags: closed.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // A bad option is refused, the handshake goes on; then a request with a bad magic closes.
    let mut s = TcpStream::connect(server.addr).unwrap();
    greet(&mut s).unwrap();
    send_option(&mut s, 0xdead, b"junk").unwrap();
    assert_eq!(read_option_reply(&mut s).unwrap().1, REP_ERR_UNSUP);
    send_option(&mut s, OPT_GO, &go_option_data("missing", &[])).unwrap();
    assert_eq!(read_option_reply(&mut s).unwrap().1, REP_ERR_UNKNOWN);
    send_option(&mut s, OPT_GO, &go_option_data("disk", &[])).unwrap();
    while read_option_reply(&mut s).unwrap().1 != REP_ACK {}
    s.write_all(&[0x42; REQUEST_LEN]).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // A client that connects and sends nothing does not block the others.
    let _idle = TcpStream::connect(server.addr).unwrap();
    let mut buf = [0u8; 10];
    assert_eq!(good.read(0, &mut buf).unwrap(), 0);
    assert_eq!(&buf, b"still here");
    let mut other = Client::connect(server.addr, "").unwrap();
    assert_eq!(other.read(0, &mut buf).unwrap(), 0);
    assert_eq!(&buf, b"still here");
    good.disconnect().unwrap();
    other.disconnect().unwrap();
    assert_eq!(server.stats().protocol_errors, 2);
}

#[test]
fn shutdown_refuses_options_and_requests() {
    // Handshake: options get NBD_REP_ERR_SHUTDOWN, ABORT still works.
    let mut disk = TrackDisk::new(65536);
    let mut stats = NbdStats::default();
    let mut conn = Connection::new(&ServerConfig::default());
    conn.shutdown();
    let mut s = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    s.extend(opt(OPT_GO, &go_option_data("disk", &[])));
    s.extend(opt(OPT_ABORT, &[]));
    let out = run(&mut conn, &mut disk, &mut stats, &s, 100);
    let kinds: Vec<u32> = option_replies(&out[GREETING_LEN..])
        .iter()
        .map(|r| r.1)
        .collect();
    assert_eq!(kinds, vec![REP_ERR_SHUTDOWN, REP_ACK]);
    assert!(conn.is_closed());

    // Transmission: a write in progress completes; later requests get ESHUTDOWN (the
    // payload of a refused write is still read), DISC closes.
    let mut conn = Connection::new(&ServerConfig::default());
    let mut s = export_name_handshake(b"disk");
    s.extend(req(CMD_WRITE, 0, 1, 0, 8));
    s.extend_from_slice(b"abcd");
    let out = run(&mut conn, &mut disk, &mut stats, &s, 100);
    assert_eq!(out.len(), GREETING_LEN + 10);
    assert!(!conn.is_between_requests());
    conn.shutdown();
    let mut s = b"efgh".to_vec();
    s.extend(req(CMD_WRITE, 0, 2, 0, 4));
    s.extend_from_slice(b"zzzz");
    s.extend(req(CMD_READ, 0, 3, 0, 4));
    s.extend(req(CMD_DISC, 0, 4, 0, 0));
    let out = run(&mut conn, &mut disk, &mut stats, &s, 100);
    let replies: Vec<(u32, u64)> = out
        .chunks_exact(SIMPLE_REPLY_LEN)
        .map(|r| (be32(&r[4..]), be64(&r[8..])))
        .collect();
    assert_eq!(replies, vec![(0, 1), (108, 2), (108, 3)]);
    assert_eq!(&disk.data[..8], b"abcdefgh");
    assert!(conn.is_closed() && conn.is_between_requests());
    assert_eq!(stats.errors_of(NbdError::Shutdown), 2);
}
