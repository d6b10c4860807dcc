//! The guest's side of growing the disk's host file ([`qcow_metal::hostfile`]): grow requests
//! go out as console lines, the runner's answers come in on the console's input.
//!
//! [`Grower`] keeps the state between calls: the request waiting for an answer, the input
//! line being assembled, and back-offs, so that a host that cannot grow (or a runner that does
//! not answer) is not asked again and again. The virtio-blk driver uses it in
//! [`crate::virtio::blk::VirtioBlk`]'s `grow`.

use alloc::vec::Vec;
use log::warn;
use qcow_metal::hostfile::{CutRequest, GrowReply, GrowRequest};

/// Longest wait for an answer to a request (a write waits this long at most).
pub const ANSWER_MS: u64 = 5_000;
/// After a request got no answer: requests fail at once for this long.
const SILENT_BACKOFF_MS: u64 = 30_000;
/// Requests ahead of need: at most one per this interval...
const AHEAD_INTERVAL_MS: u64 = 1_000;
/// ...and after one that did not get all it asked for, one per this interval.
const AHEAD_BACKOFF_MS: u64 = 10_000;
/// Longest input line kept (answers are short; longer lines are junk).
const MAX_LINE: usize = 96;

/// A request on its way: its number, what it asked for, when.
#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: u64,
    want: u64,
    sent_ms: u64,
}

/// Grow requests and their answers.
#[derive(Debug, Default)]
pub struct Grower {
    next_seq: u64,
    pending: Option<Pending>,
    line: Vec<u8>,
    /// No request ahead of need before this time.
    ahead_after_ms: u64,
    /// No answer came to the last request: fail at once until this time.
    silent_until_ms: u64,
    /// The last answer was a refusal (logged once until a growth succeeds).
    refused: bool,
}

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Still waiting.
    None,
    /// The runner grew the file (to this many bytes).
    Grown(u64),
    /// The runner could not grow it.
    Failed,
}

impl Grower {
    /// A grower that has asked nothing yet.
    pub fn new() -> Self {
        Grower::default()
    }

    /// Prints a request on the console and remembers it; returns its number.
    pub fn send(&mut self, need: u64, want: u64, now_ms: u64) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        crate::println!("{}", GrowRequest { seq, need, want });
        self.pending = Some(Pending {
            seq,
            want,
            sent_ms: now_ms,
        });
        seq
    }

    /// Prints a cut request on the console and remembers it; returns its number.
    pub fn send_cut(&mut self, len: u64, now_ms: u64) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        crate::println!("{}", CutRequest { seq, len });
        self.pending = Some(Pending {
            seq,
            want: len,
            sent_ms: now_ms,
        });
        seq
    }

    /// Whether a request for `want` bytes (or more) is on its way.
    pub fn pending_covers(&self, want: u64) -> bool {
        self.pending.is_some_and(|p| p.want >= want)
    }

    /// Whether requests are to fail at once (the runner did not answer lately).
    pub fn silent(&self, now_ms: u64) -> bool {
        now_ms < self.silent_until_ms
    }

    /// Whether a request ahead of need may go out now.
    pub fn may_ask_ahead(&self, now_ms: u64) -> bool {
        self.pending.is_none() && now_ms >= self.ahead_after_ms && !self.silent(now_ms)
    }

    /// Reads what arrived on the console's input; returns the answer to the pending request,
    /// if it came. A pending request without an answer for [`ANSWER_MS`] is given up (and
    /// requests fail at once for a while: nobody is listening).
    pub fn poll(&mut self, now_ms: u64) -> Answer {
        let mut answer = Answer::None;
        while let Some(b) = crate::serial::read_byte() {
            match b {
                b'\n' => {
                    let line = core::mem::take(&mut self.line);
                    if let Some(reply) = core::str::from_utf8(&line).ok().and_then(GrowReply::parse)
                        && let Some(a) = self.answered(reply, now_ms)
                    {
                        answer = a;
                    }
                }
                b'\r' => {}
                b if self.line.len() < MAX_LINE => self.line.push(b),
                _ => {}
            }
        }
        if answer == Answer::None
            && let Some(p) = self.pending
            && now_ms >= p.sent_ms + ANSWER_MS
        {
            warn!(
                "disk: no answer to grow request {} within {} s; the disk cannot grow for now",
                p.seq,
                ANSWER_MS / 1000
            );
            self.pending = None;
            self.silent_until_ms = now_ms + SILENT_BACKOFF_MS;
            return Answer::Failed;
        }
        answer
    }

    /// Takes an answer to the pending request (answers to older ones are ignored).
    fn answered(&mut self, reply: GrowReply, now_ms: u64) -> Option<Answer> {
        let p = self.pending.filter(|p| p.seq == reply.seq())?;
        self.pending = None;
        let (answer, complete) = match reply {
            GrowReply::Grown { len, .. } => {
                self.refused = false;
                (Answer::Grown(len), len >= p.want)
            }
            GrowReply::Failed { .. } => {
                if !self.refused {
                    warn!(
                        "disk: the host could not grow the disk's file (request {}); writes \
                         that need new space fail with ENOSPC until it can",
                        p.seq
                    );
                }
                self.refused = true;
                (Answer::Failed, false)
            }
        };
        self.ahead_after_ms = now_ms
            + if complete {
                AHEAD_INTERVAL_MS
            } else {
                AHEAD_BACKOFF_MS
            };
        Some(answer)
    }
}
