//! The per-connection state machine.

use alloc::vec::Vec;

use super::parse::{self, Method, Request, Route};
use super::response::{self, Head, TEXT_HTML, TEXT_PLAIN};
use super::{Config, HEAD_BUFFER_BYTES, Health, IndexPage, Site, Status, gzip};

/// The head limit never goes below this, whatever the configuration says.
const MIN_HEAD_BYTES: usize = 64;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading requests and answering them.
    Open,
    /// No more requests: the pending output is flushed, then the connection is closed.
    Closing,
    /// Done; pending output (if any) was dropped.
    Closed,
}

/// One HTTP/1.1 connection, fed bytes and drained of bytes by a driver.
///
/// A driver's loop, for each connection:
/// 1. offer the received bytes to [`Connection::receive`], which returns how many it took
///    (it takes fewer when its buffers are full; offer the rest later);
/// 2. on end of stream from the peer, call [`Connection::receive_eof`];
/// 3. call [`Connection::poll`] (idle timeout; requests held back while output was pending);
/// 4. send [`Connection::pending_output`] (any amount the socket accepts) and report it with
///    [`Connection::consume_output`];
/// 5. once [`Connection::is_closed`], close the socket (gracefully; nothing more is owed).
///
/// [`Connection::next_deadline`] tells when `poll` has something to do at the latest.
#[derive(Debug)]
pub struct Connection {
    config: Config,
    state: State,
    /// Bytes of the request head being received (never more than the head limit).
    input: heapless::Vec<u8, HEAD_BUFFER_BYTES>,
    /// How far `input` was searched for the end of the head.
    scanned: usize,
    /// The request line in `input` is complete and passed the early checks.
    line_checked: bool,
    /// Request-body bytes still to be skipped.
    body_left: u64,
    /// Response bytes; `output[sent..]` is still to be sent.
    output: Vec<u8>,
    sent: usize,
    /// Time of the last progress (bytes taken or sent).
    last_activity_ms: u64,
    /// When the first byte of the request now being received arrived.
    request_started_ms: Option<u64>,
    /// The peer closed its sending side.
    peer_eof: bool,
    /// The idle timeout ended (or is ending) the connection.
    timed_out: bool,
}

impl Connection {
    /// A new connection, accepted at `now_ms`.
    pub fn new(config: Config, now_ms: u64) -> Self {
        Self {
            config,
            state: State::Open,
            input: heapless::Vec::new(),
            scanned: 0,
            line_checked: false,
            body_left: 0,
            output: Vec::new(),
            sent: 0,
            last_activity_ms: now_ms,
            request_started_ms: None,
            peer_eof: false,
            timed_out: false,
        }
    }

    /// The configuration this connection runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Offers received bytes; returns how many were taken. Complete requests among them are
    /// answered at once (their responses appear in [`Connection::pending_output`]). Bytes
    /// not taken must be offered again later, after some output was sent. Once the
    /// connection is closing every byte is taken and ignored.
    pub fn receive(&mut self, bytes: &[u8], now_ms: u64, site: &mut impl Site) -> usize {
        if self.state != State::Open {
            return bytes.len();
        }
        let mut taken = 0;
        loop {
            let rest = &bytes[taken..];
            let before = taken;
            if self.body_left > 0 {
                let n = rest
                    .len()
                    .min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
                self.body_left -= n as u64;
                taken += n;
            }
            let rest = &bytes[taken..];
            let room = self.head_limit().saturating_sub(self.input.len());
            let n = rest.len().min(room);
            if n > 0 {
                if self.input.is_empty() && self.request_started_ms.is_none() {
                    self.request_started_ms = Some(now_ms);
                }
                // Cannot fail: `n` fits in the remaining room.
                let _ = self.input.extend_from_slice(&rest[..n]);
                taken += n;
            }
            self.process(now_ms, site);
            if self.state != State::Open {
                taken = bytes.len();
                break;
            }
            // Go on while bytes remain and either some were taken or answering a request
            // made room in the head buffer.
            let room = self.head_limit().saturating_sub(self.input.len());
            if taken == bytes.len() || (taken == before && room == 0) {
                break;
            }
        }
        if taken > 0 {
            self.last_activity_ms = now_ms;
            site.http_stats().count_received(taken);
        }
        taken
    }

    /// The peer will send nothing more: complete requests already received are still
    /// answered, a partial one is dropped, then the connection closes.
    pub fn receive_eof(&mut self, now_ms: u64, site: &mut impl Site) {
        self.peer_eof = true;
        self.process(now_ms, site);
    }

    /// Advances time: answers requests held back while output was pending, and applies the
    /// idle timeout (a started but incomplete request gets `408`; an idle connection is
    /// closed silently; a closing connection whose output is not taken is dropped).
    pub fn poll(&mut self, now_ms: u64, site: &mut impl Site) {
        self.process(now_ms, site);
        let timeout = self.config.idle_timeout_ms;
        let idle = now_ms.saturating_sub(self.last_activity_ms) >= timeout;
        match self.state {
            State::Open => {
                let request_late = self
                    .request_started_ms
                    .is_some_and(|start| now_ms.saturating_sub(start) >= timeout);
                if self.has_pending_output() {
                    // Waiting for the client to read; only lack of progress counts.
                    if idle {
                        self.note_timeout(site);
                        self.drop_output();
                    }
                } else if request_late || (idle && self.body_left > 0) {
                    self.note_timeout(site);
                    self.reject(Status::RequestTimeout, site);
                    // The 408 gets a full timeout to be taken by the client.
                    self.last_activity_ms = now_ms;
                } else if idle {
                    self.note_timeout(site);
                    self.state = State::Closed;
                }
            }
            State::Closing => {
                if idle && self.has_pending_output() {
                    self.note_timeout(site);
                    self.drop_output();
                }
            }
            State::Closed => {}
        }
    }

    /// The latest time at which [`Connection::poll`] has work to do (a timeout), if any.
    pub fn next_deadline(&self) -> Option<u64> {
        let timeout = self.config.idle_timeout_ms;
        match self.state {
            State::Closed => None,
            State::Closing if !self.has_pending_output() => None,
            _ => {
                let idle = self.last_activity_ms.saturating_add(timeout);
                let request = self
                    .request_started_ms
                    .filter(|_| self.state == State::Open && !self.has_pending_output())
                    .map_or(u64::MAX, |start| start.saturating_add(timeout));
                Some(idle.min(request))
            }
        }
    }

    /// Response bytes waiting to be sent.
    pub fn pending_output(&self) -> &[u8] {
        self.output.get(self.sent..).unwrap_or(&[])
    }

    /// Whether any response bytes wait to be sent.
    pub fn has_pending_output(&self) -> bool {
        self.sent < self.output.len()
    }

    /// Reports that the first `n` bytes of [`Connection::pending_output`] were sent (more
    /// than are pending counts as all of them). Call [`Connection::poll`] afterwards so held
    /// back requests are answered.
    pub fn consume_output(&mut self, n: usize, now_ms: u64) {
        let n = n.min(self.output.len() - self.sent);
        if n == 0 {
            return;
        }
        self.sent += n;
        self.last_activity_ms = now_ms;
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
            if self.output.capacity() > 4 * self.config.output_high_water {
                // Do not keep a large scrape's buffer per idle connection.
                self.output = Vec::new();
            }
        }
    }

    /// No request is being received or answered: closing the connection now loses nothing.
    /// A driver that runs out of listening sockets may close the connection that has been
    /// idle longest (see [`Connection::last_activity_ms`]) to make room for a new client.
    pub fn is_idle(&self) -> bool {
        self.state == State::Open
            && self.input.is_empty()
            && self.body_left == 0
            && !self.has_pending_output()
    }

    /// The idle timeout ended the connection. If it is also [`Connection::is_closed`], the
    /// client was not reading: a driver should abort (reset) the socket rather than wait to
    /// send a FIN behind unsent data.
    pub fn timed_out(&self) -> bool {
        self.timed_out
    }

    /// When the request being received started (its first byte arrived), while its head or
    /// body is still arriving and no response is pending: a client that sends its request
    /// slowly shows here.
    pub fn receiving_since_ms(&self) -> Option<u64> {
        self.request_started_ms
            .filter(|_| self.state == State::Open && !self.has_pending_output())
    }

    /// When this connection last made progress (bytes taken or sent), or was accepted.
    pub fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms
    }

    /// No more requests will be answered: send what is pending, then close.
    pub fn wants_close(&self) -> bool {
        self.state != State::Open
    }

    /// The connection is finished: nothing more to send; close the socket.
    pub fn is_closed(&self) -> bool {
        match self.state {
            State::Open => false,
            State::Closing => !self.has_pending_output(),
            State::Closed => true,
        }
    }

    /// Records that the idle timeout hit this connection (counted once per connection).
    fn note_timeout(&mut self, site: &mut impl Site) {
        if !self.timed_out {
            site.http_stats().count_timeout();
            self.timed_out = true;
        }
    }

    fn head_limit(&self) -> usize {
        self.config
            .max_head_bytes
            .clamp(MIN_HEAD_BYTES, HEAD_BUFFER_BYTES)
    }

    fn drop_output(&mut self) {
        self.output = Vec::new();
        self.sent = 0;
        self.state = State::Closed;
    }

    /// Removes the first `n` bytes of the input buffer.
    fn discard_input(&mut self, n: usize) {
        let n = n.min(self.input.len());
        self.input.copy_within(n.., 0);
        let len = self.input.len() - n;
        self.input.truncate(len);
        self.scanned = 0;
        self.line_checked = false;
    }

    /// Answers every complete request in the input buffer, in order, while output stays
    /// below the high-water mark.
    fn process(&mut self, now_ms: u64, site: &mut impl Site) {
        while self.state == State::Open && self.body_left == 0 {
            if self.output.len() - self.sent >= self.config.output_high_water {
                return;
            }
            let blank = parse::leading_empty_lines(&self.input);
            if blank > 0 {
                self.discard_input(blank);
            }
            if self.input.is_empty() {
                self.request_started_ms = None;
                if self.peer_eof {
                    self.state = State::Closing;
                }
                return;
            }
            if self.request_started_ms.is_none() {
                self.request_started_ms = Some(now_ms);
            }
            let from = self.scanned.saturating_sub(2);
            let Some(end) = parse::find_head_end(&self.input, from) else {
                self.scanned = self.input.len();
                let early = if self.line_checked {
                    Ok(())
                } else {
                    self.line_checked = self.input.contains(&b'\n');
                    parse::check_partial(&self.input, &self.config)
                };
                if let Err(status) = early {
                    self.reject(status, site);
                } else if self.input.len() >= self.head_limit() {
                    let status = if self.input.contains(&b'\n') {
                        Status::HeaderFieldsTooLarge
                    } else {
                        Status::UriTooLong
                    };
                    self.reject(status, site);
                } else if self.peer_eof {
                    // A partial request that can never complete.
                    self.state = State::Closing;
                }
                return;
            };
            let parsed = parse::parse_head(&self.input[..end], &self.config);
            self.discard_input(end);
            self.request_started_ms = None;
            match parsed {
                Ok(request) => {
                    let in_buffer = self
                        .input
                        .len()
                        .min(usize::try_from(request.content_length).unwrap_or(usize::MAX));
                    self.discard_input(in_buffer);
                    self.body_left = request.content_length - in_buffer as u64;
                    // A client that waits for `100 Continue` (never sent) may not send its
                    // body after our final answer; then the framing is lost, so close.
                    let keep_alive =
                        request.keep_alive && !(request.expect_continue && self.body_left > 0);
                    self.respond(&request, keep_alive, site);
                    if !keep_alive {
                        self.state = State::Closing;
                    }
                }
                Err(status) => self.reject(status, site),
            }
        }
        if self.state == State::Open && self.peer_eof && self.body_left > 0 {
            self.state = State::Closing;
        }
    }

    /// Answers a malformed or timed-out request and closes.
    fn reject(&mut self, status: Status, site: &mut impl Site) {
        if status != Status::RequestTimeout {
            site.http_stats().count_bad_request();
        }
        let body = error_body(status);
        self.queue(
            Head {
                status,
                content_type: TEXT_PLAIN,
                content_length: body.len(),
                gzip: false,
                vary: None,
                allow: false,
                close: true,
                http10_keep_alive: false,
            },
            body.as_bytes(),
            true,
            site,
        );
        self.state = State::Closing;
        self.input.truncate(0);
        self.scanned = 0;
        self.line_checked = false;
        self.body_left = 0;
    }

    /// Answers a well-formed request.
    fn respond(&mut self, request: &Request, keep_alive: bool, site: &mut impl Site) {
        let close = !keep_alive;
        let mut body = Vec::new();
        let mut vary = None;
        let mut allow = false;
        let (status, content_type) = if request.method == Method::Other {
            allow = true;
            body.extend_from_slice(error_body(Status::MethodNotAllowed).as_bytes());
            (Status::MethodNotAllowed, TEXT_PLAIN)
        } else {
            match request.route {
                Route::Metrics => {
                    vary = Some("Accept, Accept-Encoding");
                    let content_type = site.metrics(&request.accept, &mut body);
                    (Status::Ok, content_type)
                }
                Route::Index => {
                    vary = Some("Accept-Encoding");
                    let mut page = IndexPage::new();
                    site.index(&mut page);
                    page.render(&mut body);
                    (Status::Ok, TEXT_HTML)
                }
                Route::Healthz => match site.healthz() {
                    Health::Ok => {
                        body.extend_from_slice(b"ok\n");
                        (Status::Ok, TEXT_PLAIN)
                    }
                    Health::Unavailable(why) => {
                        body.extend_from_slice(why.trim_end().as_bytes());
                        body.push(b'\n');
                        (Status::ServiceUnavailable, TEXT_PLAIN)
                    }
                },
                Route::NotFound => {
                    body.extend_from_slice(error_body(Status::NotFound).as_bytes());
                    (Status::NotFound, TEXT_PLAIN)
                }
            }
        };
        let gzip = request.gzip && status == Status::Ok && body.len() >= self.config.gzip_min_bytes;
        if gzip {
            body = gzip::compress(&body, self.config.gzip_level);
        }
        self.queue(
            Head {
                status,
                content_type,
                content_length: body.len(),
                gzip,
                vary,
                allow,
                close,
                http10_keep_alive: request.http10 && !close,
            },
            &body,
            request.method != Method::Head,
            site,
        );
    }

    /// Appends a response to the output and counts it.
    fn queue(&mut self, head: Head<'_>, body: &[u8], with_body: bool, site: &mut impl Site) {
        if self.sent > 0 {
            self.output.drain(..self.sent);
            self.sent = 0;
        }
        let start = self.output.len();
        response::write_head(&head, &mut self.output);
        if with_body {
            self.output.extend_from_slice(body);
        }
        site.http_stats()
            .count_response(head.status, self.output.len() - start, head.gzip);
    }
}

/// The plain-text body of a response the responder writes itself.
fn error_body(status: Status) -> &'static str {
    match status {
        Status::Ok => "ok\n",
        Status::BadRequest => "400 Bad Request\n",
        Status::NotFound => "404 Not Found: this guest serves /, /metrics and /healthz\n",
        Status::MethodNotAllowed => "405 Method Not Allowed: use GET or HEAD\n",
        Status::RequestTimeout => "408 Request Timeout\n",
        Status::PayloadTooLarge => "413 Content Too Large\n",
        Status::UriTooLong => "414 URI Too Long\n",
        Status::HeaderFieldsTooLarge => "431 Request Header Fields Too Large\n",
        Status::NotImplemented => "501 Not Implemented: Transfer-Encoding is not supported\n",
        Status::ServiceUnavailable => "503 Service Unavailable\n",
        Status::VersionNotSupported => "505 HTTP Version Not Supported\n",
    }
}
