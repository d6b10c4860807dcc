//! A blocking std driver for [`Connection`]: serves one `TcpStream` on the calling thread.
//! For host tests and tools; the guest drives connections over smoltcp instead.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use super::{Config, Connection, Site};

/// How long one blocking read or write waits before the driver polls the connection.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long a closing connection keeps reading (and dropping) what the peer still sends.
const LINGER: Duration = Duration::from_millis(500);

/// Serves HTTP on `stream` until the connection closes (by the protocol, the idle timeout
/// or the peer). Writes may be partial; bytes the connection does not take yet are held and
/// offered again. A peer that resets the connection ends it without error.
pub fn serve_stream(stream: &TcpStream, config: Config, site: &mut impl Site) -> io::Result<()> {
    let start = Instant::now();
    let now = || u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    stream.set_read_timeout(Some(POLL_INTERVAL))?;
    stream.set_write_timeout(Some(POLL_INTERVAL))?;
    let mut conn = Connection::new(config, now());
    let mut buf = vec![0u8; 4096];
    let mut held: Vec<u8> = Vec::new();
    let mut eof = false;
    let mut stream = stream;
    loop {
        while conn.has_pending_output() {
            match stream.write(conn.pending_output()) {
                Ok(0) => return Ok(()),
                Ok(n) => conn.consume_output(n, now()),
                Err(e) if is_timeout(&e) => break,
                Err(e) if is_gone(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
            conn.poll(now(), site);
        }
        conn.poll(now(), site);
        if conn.is_closed() {
            linger(stream);
            return Ok(());
        }
        if conn.has_pending_output() {
            continue;
        }
        if !held.is_empty() {
            let n = conn.receive(&held, now(), site);
            held.drain(..n);
            continue;
        }
        if eof {
            // Waiting for the idle timeout or for held-back requests; nothing to read.
            std::thread::sleep(POLL_INTERVAL);
            continue;
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                eof = true;
                conn.receive_eof(now(), site);
            }
            Ok(n) => {
                let taken = conn.receive(&buf[..n], now(), site);
                held.extend_from_slice(&buf[taken..n]);
            }
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Closes our sending side, then reads and drops what the peer still sends for a short
/// while, so that unread request bytes do not make the close a reset that could destroy the
/// last response before the peer read it.
fn linger(mut stream: &TcpStream) {
    // The peer may already be gone; nothing is owed to it either way.
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}
