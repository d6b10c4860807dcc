//! Capturing a guest's serial console (QEMU's stdout) and QEMU's stderr.
//!
//! A thread reads the stream as it comes and tees it: to the terminal when asked, to a log
//! file when given, and into memory, where callers wait for lines matching a pattern.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Where a captured stream is echoed live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Echo {
    /// Not echoed.
    #[default]
    Off,
    /// Echoed to this process's stdout.
    Stdout,
    /// Echoed to this process's stderr.
    Stderr,
}

#[derive(Default)]
struct State {
    /// Complete lines (without the line ending) and when each was received.
    lines: Vec<(Instant, String)>,
    /// The unterminated tail.
    partial: String,
    /// Everything received, as text.
    text: String,
    /// The stream reached its end (QEMU exited or closed it).
    closed: bool,
    /// Where new output is echoed.
    echo: Echo,
}

fn echo_to(echo: Echo, bytes: &[u8]) {
    // Echo failures (a closed terminal) must not stop the capture the waiters depend on.
    match echo {
        Echo::Off => {}
        Echo::Stdout => {
            let mut out = io::stdout().lock();
            let _ = out.write_all(bytes).and_then(|()| out.flush());
        }
        Echo::Stderr => {
            let _ = io::stderr().lock().write_all(bytes);
        }
    }
}

/// The result of waiting for a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// A matching line: when it arrived and its text.
    Found(Instant, String),
    /// The stream ended without one.
    Closed,
    /// The time ran out, or the caller's stop condition held.
    TimedOut,
}

/// A captured stream, shared between its reader thread and any number of waiters.
#[derive(Clone)]
pub struct Console {
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl Console {
    /// Starts a thread that reads `reader` to its end, echoing and logging what it reads.
    pub fn capture<R: Read + Send + 'static>(
        mut reader: R,
        echo: Echo,
        mut log: Option<File>,
    ) -> Console {
        let console = Console {
            shared: Arc::new((
                Mutex::new(State {
                    echo,
                    ..State::default()
                }),
                Condvar::new(),
            )),
        };
        let shared = console.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let chunk = &buf[..n];
                // A log failure (a full disk) must not stop the capture either.
                if let Some(f) = log.as_mut() {
                    let _ = f.write_all(chunk);
                }
                shared.push(chunk);
            }
            if let Some(f) = log.as_mut() {
                let _ = f.flush();
            }
            let mut st = shared.lock();
            if !st.partial.is_empty() {
                let line = std::mem::take(&mut st.partial);
                st.lines.push((Instant::now(), line));
            }
            st.closed = true;
            shared.shared.1.notify_all();
        });
        console
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a waiter panicked; the text is still good.
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, chunk: &[u8]) {
        let now = Instant::now();
        let text = String::from_utf8_lossy(chunk);
        let mut st = self.lock();
        // Echoed under the lock, so that `set_echo`'s replay and live output keep order.
        echo_to(st.echo, chunk);
        st.text.push_str(&text);
        for c in text.chars() {
            match c {
                '\n' => {
                    let line = std::mem::take(&mut st.partial);
                    st.lines.push((now, line));
                }
                '\r' => {}
                c => st.partial.push(c),
            }
        }
        self.shared.1.notify_all();
    }

    /// Starts (or stops) echoing; when `replay`, first echoes what was received so far.
    pub fn set_echo(&self, echo: Echo, replay: bool) {
        let mut st = self.lock();
        if replay {
            echo_to(echo, st.text.as_bytes());
        }
        st.echo = echo;
    }

    /// Everything received so far.
    pub fn text(&self) -> String {
        self.lock().text.clone()
    }

    /// The last `n` lines received (plus an unterminated tail), for error reports.
    pub fn tail(&self, n: usize) -> String {
        let st = self.lock();
        let start = st.lines.len().saturating_sub(n);
        let mut out: Vec<&str> = st.lines[start..].iter().map(|(_, l)| l.as_str()).collect();
        if !st.partial.is_empty() {
            out.push(&st.partial);
        }
        out.join("\n")
    }

    /// Whether the stream has ended.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Waits up to `timeout` for the complete line number `index` (from 0) and returns it;
    /// [`Wait::Closed`] when the stream ended before it, [`Wait::TimedOut`] otherwise. Lets a
    /// reader go through every line once, as they come.
    pub fn line_at(&self, index: usize, timeout: Duration) -> Wait {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some((at, line)) = st.lines.get(index) {
                return Wait::Found(*at, line.clone());
            }
            if st.closed {
                return Wait::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Wait::TimedOut;
            }
            st = self
                .shared
                .1
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until a complete line satisfies `matches` (lines already received count), the
    /// stream ends, `timeout` passes or `stop()` returns true (checked every 100 ms).
    pub fn wait_for(
        &self,
        mut matches: impl FnMut(&str) -> bool,
        timeout: Duration,
        mut stop: impl FnMut() -> bool,
    ) -> Wait {
        let deadline = Instant::now() + timeout;
        let mut scanned = 0;
        let mut st = self.lock();
        loop {
            for (at, line) in &st.lines[scanned..] {
                if matches(line) {
                    return Wait::Found(*at, line.clone());
                }
            }
            scanned = st.lines.len();
            if st.closed {
                return Wait::Closed;
            }
            let now = Instant::now();
            if now >= deadline || stop() {
                return Wait::TimedOut;
            }
            let slice = (deadline - now).min(Duration::from_millis(100));
            st = self
                .shared
                .1
                .wait_timeout(st, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn lines_are_found_and_logged() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("serial.log");
        let log = File::create(&log_path).unwrap();
        let input = b"boot\r\nqcow-metal 0.1.0 ready in 12 ms: virtio-blk\r\ntail".to_vec();
        let c = Console::capture(Cursor::new(input.clone()), Echo::Off, Some(log));
        let found = c.wait_for(
            |l| l.contains("ready in"),
            Duration::from_secs(30),
            || false,
        );
        let Wait::Found(_, line) = found else {
            panic!("not found: {found:?}")
        };
        assert_eq!(line, "qcow-metal 0.1.0 ready in 12 ms: virtio-blk");
        let end = c.wait_for(|l| l == "nothing", Duration::from_secs(30), || false);
        assert_eq!(end, Wait::Closed);
        assert!(c.is_closed());
        assert_eq!(c.text(), String::from_utf8(input.clone()).unwrap());
        assert_eq!(c.tail(1), "tail");
        assert_eq!(std::fs::read(&log_path).unwrap(), input);
        // The unterminated tail became a line at the end of the stream.
        assert!(matches!(
            c.wait_for(|l| l == "tail", Duration::from_secs(1), || false),
            Wait::Found(..)
        ));
    }

    #[test]
    fn waits_stop_on_request() {
        let (reader, _writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = Console::capture(reader, Echo::Off, None);
        let w = c.wait_for(|_| true, Duration::from_secs(600), || true);
        assert_eq!(w, Wait::TimedOut);
    }
}
