//! A byte queue with a read cursor, for the connection's input and output.
//!
//! Bytes are appended at `end` and taken from `start`; the backing `Vec` only grows (to the
//! largest size ever needed) so that reads from the disk can go straight into its tail
//! without zero-filling on every request. Pending bytes are moved to the front when at least
//! half of the buffer has been taken and they are no more than what was taken (so each byte
//! is copied at most once more, amortised), or when the tail has no room for what is about
//! to be appended.

use alloc::vec::Vec;

pub(crate) struct ByteQueue {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl ByteQueue {
    /// An empty queue with `initial` bytes allocated.
    pub(crate) fn new(initial: usize) -> Self {
        ByteQueue {
            data: alloc::vec![0; initial],
            start: 0,
            end: 0,
        }
    }

    /// Bytes waiting to be taken.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Number of bytes waiting.
    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether nothing is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Takes `n` bytes (at most all of them) from the front.
    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start >= self.data.len() / 2 && self.len() <= self.start {
            // Move the rest to the front while it is no larger than what was taken since the
            // last move: amortised, every byte is copied at most once more, and the tail stays
            // long enough for a whole piece without a large move later.
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Drops everything.
    pub(crate) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Makes `n` contiguous bytes available after the pending ones and returns them; they
    /// count as pending only after [`ByteQueue::commit`].
    pub(crate) fn tail(&mut self, n: usize) -> &mut [u8] {
        if self.data.len() - self.end < n {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.data.len() - self.end < n {
                let want = (self.end + n).max(self.data.len().saturating_mul(2));
                self.data.resize(want, 0);
            }
        }
        &mut self.data[self.end..self.end + n]
    }

    /// Makes `n` bytes written through [`ByteQueue::tail`] pending.
    pub(crate) fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    /// Appends `bytes`.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.tail(bytes.len()).copy_from_slice(bytes);
        self.commit(bytes.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_appends_consumes_and_compacts() {
        let mut q = ByteQueue::new(4);
        q.push(b"abc");
        q.consume(2);
        assert_eq!(q.pending(), b"c");
        q.push(b"defgh");
        assert_eq!(q.pending(), b"cdefgh");
        let t = q.tail(3);
        t.copy_from_slice(b"xyz");
        assert_eq!(q.pending(), b"cdefgh", "not pending before commit");
        q.commit(3);
        assert_eq!(q.pending(), b"cdefghxyz");
        q.consume(100);
        assert!(q.is_empty());
        assert_eq!(q.len(), 0);
    }
}
