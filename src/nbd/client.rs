//! A small blocking NBD client over std TCP, for host tests and benchmarks.
//!
//! It negotiates fixed newstyle, structured replies and `base:allocation`, enters
//! transmission with `NBD_OPT_GO`, and can keep several requests in flight
//! ([`Client::send`] then [`Client::recv`]); replies may come in any order but the chunks of
//! one structured reply must not be interleaved with other replies (this crate's server
//! never does that).

use super::proto::*;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// What a connection negotiates.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Export to open.
    pub export: String,
    /// Ask for structured replies.
    pub structured: bool,
    /// Ask for `base:allocation` (needs structured replies).
    pub base_allocation: bool,
    /// Read and write timeout of the socket (`None`: block forever). A guard against a
    /// server that stops answering, so that tests fail instead of hanging.
    pub timeout: Option<Duration>,
}

impl ClientOptions {
    /// Structured replies and `base:allocation` on `export`.
    pub fn new(export: &str) -> Self {
        ClientOptions {
            export: export.to_string(),
            structured: true,
            base_allocation: true,
            timeout: None,
        }
    }
}

/// One answered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request's handle.
    pub handle: u64,
    /// NBD error value (0: success).
    pub error: u32,
    /// Block-status descriptors (length, flags), for `NBD_CMD_BLOCK_STATUS`.
    pub extents: Vec<(u32, u32)>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    kind: u16,
    offset: u64,
    len: u32,
}

/// A blocking NBD client.
pub struct Client {
    stream: TcpStream,
    size: u64,
    flags: u16,
    structured: bool,
    base_allocation: bool,
    next_handle: u64,
    inflight: HashMap<u64, Pending>,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_exact_vec(s: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)?;
    Ok(v)
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: export `name`, then the information
/// requests `infos` (`NBD_INFO_*`).
pub fn go_option_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        d.extend_from_slice(&info.to_be_bytes());
    }
    d
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: export `name`,
/// then the context `queries`.
pub fn meta_context_option_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Sends one option (header and data) on a handshake stream.
pub fn send_option(s: &mut TcpStream, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// Reads one option reply: (option, reply type, data).
pub fn read_option_reply(s: &mut TcpStream) -> io::Result<(u32, u32, Vec<u8>)> {
    let h = read_exact_vec(s, 20)?;
    if be64(&h) != OPT_REPLY_MAGIC {
        return Err(invalid("bad option reply magic"));
    }
    let len = be32(&h[16..]) as usize;
    if len > 1 << 20 {
        return Err(invalid("option reply too long"));
    }
    let data = read_exact_vec(s, len)?;
    Ok((be32(&h[8..]), be32(&h[12..]), data))
}

/// Reads the server greeting and sends the client flags; returns the handshake flags.
pub fn greet(s: &mut TcpStream) -> io::Result<u16> {
    let g = read_exact_vec(s, GREETING_LEN)?;
    if be64(&g) != NBDMAGIC || be64(&g[8..]) != IHAVEOPT {
        return Err(invalid("not an NBD newstyle server"));
    }
    let hflags = be16(&g[16..]);
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;
    Ok(hflags)
}

impl Client {
    /// Connects to `addr` and opens `export` with structured replies and `base:allocation`.
    pub fn connect(addr: impl ToSocketAddrs, export: &str) -> io::Result<Client> {
        Client::connect_with(addr, &ClientOptions::new(export))
    }

    /// Connects to `addr` with the given options.
    pub fn connect_with(addr: impl ToSocketAddrs, opts: &ClientOptions) -> io::Result<Client> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(opts.timeout)?;
        s.set_write_timeout(opts.timeout)?;
        let hflags = greet(&mut s)?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(invalid("server is not fixed newstyle"));
        }
        let mut structured = false;
        let mut base_allocation = false;
        if opts.structured {
            send_option(&mut s, OPT_STRUCTURED_REPLY, &[])?;
            let (_, kind, _) = read_option_reply(&mut s)?;
            structured = kind == REP_ACK;
        }
        if structured && opts.base_allocation {
            let q = META_BASE_ALLOCATION.as_bytes();
            let d = meta_context_option_data(&opts.export, &[META_BASE_ALLOCATION]);
            send_option(&mut s, OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (_, kind, data) = read_option_reply(&mut s)?;
                match kind {
                    REP_META_CONTEXT => base_allocation = data.get(4..) == Some(q),
                    REP_ACK => break,
                    k if k & 0x8000_0000 != 0 => break,
                    _ => return Err(invalid("unexpected reply to SET_META_CONTEXT")),
                }
            }
        }
        send_option(&mut s, OPT_GO, &go_option_data(&opts.export, &[]))?;
        let mut export = None;
        loop {
            let (_, kind, data) = read_option_reply(&mut s)?;
            match kind {
                REP_INFO if data.len() >= 12 && be16(&data) == INFO_EXPORT => {
                    export = Some((be64(&data[2..]), be16(&data[10..])));
                }
                REP_INFO => {}
                REP_ACK => break,
                k => {
                    return Err(invalid(format!(
                        "NBD_OPT_GO refused (reply {k:#x}): {}",
                        String::from_utf8_lossy(&data)
                    )));
                }
            }
        }
        let (size, flags) = export.ok_or_else(|| invalid("no NBD_INFO_EXPORT"))?;
        Ok(Client {
            stream: s,
            size,
            flags,
            structured,
            base_allocation,
            next_handle: 1,
            inflight: HashMap::new(),
        })
    }

    /// Size of the export.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags of the export.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Whether structured replies were negotiated.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// Whether `base:allocation` was negotiated.
    pub fn base_allocation(&self) -> bool {
        self.base_allocation
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// The underlying stream (for tests that misbehave on purpose).
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Sends one request (with `payload` for writes); returns its handle.
    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let req = Request {
            flags,
            kind,
            handle,
            offset,
            len,
        };
        if payload.is_empty() {
            self.stream.write_all(&req.encode())?;
        } else {
            let mut m = Vec::with_capacity(REQUEST_LEN + payload.len());
            m.extend_from_slice(&req.encode());
            m.extend_from_slice(payload);
            self.stream.write_all(&m)?;
        }
        if kind != CMD_DISC {
            self.inflight.insert(handle, Pending { kind, offset, len });
        }
        Ok(handle)
    }

    /// Receives one reply. The data of a successful read lands in `data` (resized to the
    /// read's length).
    pub fn recv(&mut self, data: &mut Vec<u8>) -> io::Result<Reply> {
        let mut magic = [0u8; 4];
        self.stream.read_exact(&mut magic)?;
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.stream.read_exact(&mut h)?;
                let error = be32(&h);
                let handle = be64(&h[4..]);
                let p = self
                    .inflight
                    .remove(&handle)
                    .ok_or_else(|| invalid("reply to an unknown handle"))?;
                if p.kind == CMD_READ && error == 0 {
                    data.resize(p.len as usize, 0);
                    self.stream.read_exact(data)?;
                }
                Ok(Reply {
                    handle,
                    error,
                    extents: Vec::new(),
                })
            }
            STRUCTURED_REPLY_MAGIC => self.recv_structured(data),
            m => Err(invalid(format!("bad reply magic {m:#x}"))),
        }
    }

    fn recv_structured(&mut self, data: &mut Vec<u8>) -> io::Result<Reply> {
        let mut first = true;
        let mut reply = Reply {
            handle: 0,
            error: 0,
            extents: Vec::new(),
        };
        let mut pending = None;
        loop {
            if !first {
                let mut magic = [0u8; 4];
                self.stream.read_exact(&mut magic)?;
                if u32::from_be_bytes(magic) != STRUCTURED_REPLY_MAGIC {
                    return Err(invalid("bad structured reply magic"));
                }
            }
            let mut h = [0u8; 16];
            self.stream.read_exact(&mut h)?;
            let flags = be16(&h);
            let kind = be16(&h[2..]);
            let handle = be64(&h[4..]);
            let len = be32(&h[12..]) as usize;
            if first {
                reply.handle = handle;
                let p = *self
                    .inflight
                    .get(&handle)
                    .ok_or_else(|| invalid("reply to an unknown handle"))?;
                if p.kind == CMD_READ {
                    data.clear();
                    data.resize(p.len as usize, 0);
                }
                pending = Some(p);
                first = false;
            } else if handle != reply.handle {
                return Err(invalid("interleaved structured replies"));
            }
            let p = pending.ok_or_else(|| invalid("no request"))?;
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    if len < 9 {
                        return Err(invalid("short OFFSET_DATA chunk"));
                    }
                    let mut o = [0u8; 8];
                    self.stream.read_exact(&mut o)?;
                    let off = u64::from_be_bytes(o);
                    let n = len - 8;
                    let start = off
                        .checked_sub(p.offset)
                        .filter(|s| s + n as u64 <= u64::from(p.len))
                        .ok_or_else(|| invalid("OFFSET_DATA outside the request"))?
                        as usize;
                    self.stream.read_exact(&mut data[start..start + n])?;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let b = read_exact_vec(&mut self.stream, len)?;
                    if len != 12 {
                        return Err(invalid("bad OFFSET_HOLE chunk"));
                    }
                    let start = be64(&b).wrapping_sub(p.offset) as usize;
                    let n = be32(&b[8..]) as usize;
                    if start.checked_add(n).is_none_or(|e| e > data.len()) {
                        return Err(invalid("OFFSET_HOLE outside the request"));
                    }
                    data[start..start + n].fill(0);
                }
                REPLY_TYPE_BLOCK_STATUS => {
                    let b = read_exact_vec(&mut self.stream, len)?;
                    if len < 12 || !(len - 4).is_multiple_of(8) {
                        return Err(invalid("bad BLOCK_STATUS chunk"));
                    }
                    reply.extents = b[4..]
                        .chunks_exact(8)
                        .map(|d| (be32(d), be32(&d[4..])))
                        .collect();
                }
                REPLY_TYPE_NONE => {
                    if len != 0 {
                        return Err(invalid("NONE chunk with payload"));
                    }
                }
                k if k & 0x8000 != 0 => {
                    let b = read_exact_vec(&mut self.stream, len)?;
                    if len < 6 {
                        return Err(invalid("short error chunk"));
                    }
                    reply.error = be32(&b);
                }
                k => return Err(invalid(format!("unknown chunk type {k}"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                self.inflight.remove(&reply.handle);
                return Ok(reply);
            }
        }
    }

    fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<Reply> {
        self.send(kind, flags, offset, len, payload)?;
        let mut scratch = Vec::new();
        self.recv(&mut scratch)
    }

    /// Reads `buf.len()` bytes at `offset`; returns the NBD error value (0: success).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<u32> {
        self.send(CMD_READ, 0, offset, buf.len() as u32, &[])?;
        let mut data = Vec::new();
        let r = self.recv(&mut data)?;
        if r.error == 0 {
            buf.copy_from_slice(&data);
        }
        Ok(r.error)
    }

    /// Writes `data` at `offset` (with FUA when `fua`); returns the NBD error value.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<u32> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        Ok(self
            .call(CMD_WRITE, flags, offset, data.len() as u32, data)?
            .error)
    }

    /// Flushes; returns the NBD error value.
    pub fn flush(&mut self) -> io::Result<u32> {
        Ok(self.call(CMD_FLUSH, 0, 0, 0, &[])?.error)
    }

    /// Trims; returns the NBD error value.
    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<u32> {
        Ok(self.call(CMD_TRIM, 0, offset, len, &[])?.error)
    }

    /// Writes zeros (command flags as given); returns the NBD error value.
    pub fn write_zeroes(&mut self, offset: u64, len: u32, flags: u16) -> io::Result<u32> {
        Ok(self.call(CMD_WRITE_ZEROES, flags, offset, len, &[])?.error)
    }

    /// Block status of `len` bytes at `offset`: the reply (error and descriptors).
    pub fn block_status(&mut self, offset: u64, len: u32, req_one: bool) -> io::Result<Reply> {
        let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        self.call(CMD_BLOCK_STATUS, flags, offset, len, &[])
    }

    /// Sends `NBD_CMD_DISC` and waits for the server to close the connection.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(CMD_DISC, 0, 0, 0, &[])?;
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest)?;
        if rest.is_empty() {
            Ok(())
        } else {
            Err(invalid("data after NBD_CMD_DISC"))
        }
    }
}
