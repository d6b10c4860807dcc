//! The HTTP request stream: arbitrary bytes into the sans-I/O responder, cut into pieces,
//! with time passing, output taken slowly or not at all, and an end of input. Any answer is
//! fine; a panic, a stall with input waiting, or output piling up past the high-water mark
//! plus one response is not.
//!
//! Input: byte 0 picks how the rest is cut and how fast the client reads; the rest is what
//! the client sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow_metal::http::{Config, Connection, Health, HttpStats, IndexPage, Site};

struct FuzzSite {
    stats: HttpStats,
    body: Vec<u8>,
}

impl Site for FuzzSite {
    fn metrics(&mut self, accept: &str, out: &mut Vec<u8>) -> &'static str {
        out.extend_from_slice(&self.body);
        if accept.contains("openmetrics") {
            out.extend_from_slice(b"# EOF\n");
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        } else {
            "text/plain; version=0.0.4; charset=utf-8"
        }
    }
    fn index(&mut self, page: &mut IndexPage) {
        page.fact("NBD export", "disk on port 10809")
            .fact("<b>escaped</b>", "&\"'");
    }
    fn healthz(&mut self) -> Health {
        Health::Ok
    }
    fn http_stats(&self) -> &HttpStats {
        &self.stats
    }
}

fn run(data: &[u8]) {
    let [mode, input @ ..] = data else { return };
    let cut = [usize::MAX, 1, 3, 64, 700, 4096, 9000, 20000][(mode & 7) as usize];
    // How many output bytes the client takes per step (0: none until the end).
    let read = [usize::MAX, 0, 1, 100][(mode >> 3 & 3) as usize];
    let step_ms = [0u64, 1, 1000, 40_000][(mode >> 5 & 3) as usize];
    let mut body = Vec::new();
    for i in 0..300 {
        body.extend_from_slice(format!("fuzz_total{{i=\"{i}\"}} {}\n", i * 13).as_bytes());
    }
    let mut site = FuzzSite {
        stats: HttpStats::new(),
        body,
    };
    let config = Config::default();
    // One response: the largest body (the index page or the metrics, uncompressed) plus
    // headers.
    let mut page = IndexPage::new();
    site.index(&mut page);
    let mut index = Vec::new();
    page.render(&mut index);
    let bound = config.output_high_water + index.len().max(site.body.len()) + 4096;
    let mut conn = Connection::new(config, 0);
    let mut now = 0u64;
    let mut rest = input;
    let mut stalled = 0;
    while !conn.is_closed() && stalled < 4 {
        now += step_ms;
        let piece = &rest[..rest.len().min(cut)];
        let took = conn.receive(piece, now, &mut site);
        rest = &rest[took..];
        let pending = conn.pending_output().len();
        assert!(pending <= bound, "{pending} output bytes buffered");
        let n = pending.min(read);
        conn.consume_output(n, now);
        conn.poll(now, &mut site);
        if rest.is_empty() {
            conn.receive_eof(now, &mut site);
            let n = conn.pending_output().len();
            conn.consume_output(n, now);
            now += 31_000;
            conn.poll(now, &mut site);
            break;
        }
        if took == 0 && n == 0 {
            // The client does not read: only the idle timeout can move things on.
            stalled += 1;
            now += 31_000;
            conn.poll(now, &mut site);
        } else {
            stalled = 0;
        }
    }
    // Draining everything and waiting past the timeout ends every connection.
    for _ in 0..4 {
        let n = conn.pending_output().len();
        conn.consume_output(n, now);
        conn.receive_eof(now, &mut site);
        now += 31_000;
        conn.poll(now, &mut site);
    }
    assert!(
        conn.is_closed(),
        "the connection did not end after EOF and the idle timeout"
    );
}

fuzz_target!(|data: &[u8]| run(data));
