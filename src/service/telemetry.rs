//! What the listener pools report: per port, connections accepted, refused, evicted and
//! timed out, the pool's sockets, and the socket buffer memory against its budget.

use core::fmt;

use crate::metrics::{Encoder, Meta, Value};

/// What happened to the connections of one port since boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Connections accepted (a session was started).
    pub accepted: u64,
    /// Connection attempts answered with RST: no socket was listening, the pool could not
    /// grow (maximum or memory budget reached) and no connection could be evicted.
    pub refused: u64,
    /// Connections closed to make room for new ones (finished, then longest idle, then
    /// longest stalled first), or because slow clients held more than their share.
    pub evicted: u64,
    /// Connections closed by an idle timeout.
    pub timed_out: u64,
}

/// One port's figures at scrape time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortFigures {
    /// The `service` label: `http` (the metrics port) or `nbd`.
    pub service: &'static str,
    /// Its connection counts.
    pub stats: PortStats,
    /// Sockets in its pool.
    pub sockets: usize,
    /// Of which listening.
    pub listening: usize,
}

/// A per-port counter family: name, help, and how to read it from [`PortStats`].
type PortCount = (&'static str, &'static str, fn(&PortStats) -> u64);

/// The pools' figures at scrape time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionFigures<'a> {
    /// One entry per port.
    pub ports: &'a [PortFigures],
    /// Bytes of socket buffers the pools hold.
    pub buffer_bytes: u64,
    /// Most bytes of socket buffers the pools may hold.
    pub buffer_budget: u64,
}

impl ConnectionFigures<'_> {
    /// Writes the families `qcow_metal_connections_{accepted,refused,evicted,timed_out}_total`
    /// and `qcow_metal_listener_sockets` (label `service`), and the socket buffer gauges.
    pub fn encode(&self, enc: &mut Encoder<'_>) -> fmt::Result {
        const SERVICE: &[&str; 1] = &["service"];
        let counts: [PortCount; 4] = [
            (
                "qcow_metal_connections_accepted",
                "TCP connections accepted, by service port.",
                |s| s.accepted,
            ),
            (
                "qcow_metal_connections_refused",
                "Connection attempts answered with a reset: no socket listening, the pool at \
                 its maximum or memory budget, and nothing to evict.",
                |s| s.refused,
            ),
            (
                "qcow_metal_connections_evicted",
                "Connections closed to make room for new ones (finished, idle, or stalled \
                 ones first), or slow clients above their share of the pool.",
                |s| s.evicted,
            ),
            (
                "qcow_metal_connections_timed_out",
                "Connections closed by an idle timeout.",
                |s| s.timed_out,
            ),
        ];
        for (name, help, get) in counts {
            enc.family(
                &Meta::counter(name, help),
                SERVICE,
                self.ports
                    .iter()
                    .map(|p| ([p.service], Value::U64(get(&p.stats)))),
            )?;
        }
        const SERVICE_STATE: &[&str; 2] = &["service", "state"];
        enc.family(
            &Meta::gauge(
                "qcow_metal_listener_sockets",
                "Sockets in a service port's pool: listening, or holding a connection.",
            ),
            SERVICE_STATE,
            self.ports.iter().flat_map(|p| {
                [
                    ([p.service, "listening"], Value::U64(p.listening as u64)),
                    (
                        [p.service, "connected"],
                        Value::U64(p.sockets.saturating_sub(p.listening) as u64),
                    ),
                ]
            }),
        )?;
        enc.family(
            &Meta::gauge(
                "qcow_metal_socket_buffer_bytes",
                "Bytes of TCP socket buffers the service ports' pools hold.",
            )
            .unit("bytes"),
            &[],
            [([], Value::U64(self.buffer_bytes))],
        )?;
        enc.family(
            &Meta::gauge(
                "qcow_metal_socket_buffer_budget_bytes",
                "Most bytes of TCP socket buffers the pools may hold (net_buffers=).",
            )
            .unit("bytes"),
            &[],
            [([], Value::U64(self.buffer_budget))],
        )
    }
}
