//! Counters of the guest's network interface, kept by its driver, and their telemetry
//! (label `interface`, `direction`).

use crate::metrics::{Encoder, Meta, Value};
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Frames and bytes through one network interface. Updated lock-free by the driver.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames received.
    pub rx_packets: AtomicU64,
    /// Bytes of the frames received.
    pub rx_bytes: AtomicU64,
    /// Frames sent.
    pub tx_packets: AtomicU64,
    /// Bytes of the frames sent.
    pub tx_bytes: AtomicU64,
    /// Frames dropped (device errors, or a frame too big for a buffer).
    pub dropped: AtomicU64,
}

impl NetStats {
    /// Writes the interface's families for the interface `interface`.
    pub fn encode(&self, enc: &mut Encoder<'_>, interface: &str) -> fmt::Result {
        const LABELS: &[&str; 2] = &["interface", "direction"];
        let pair = |rx: &AtomicU64, tx: &AtomicU64| {
            [
                ([interface, "in"], Value::U64(rx.load(Relaxed))),
                ([interface, "out"], Value::U64(tx.load(Relaxed))),
            ]
        };
        enc.family(
            &Meta::counter(
                "qcow_metal_net_packets",
                "Packets through the guest's network interface, by direction.",
            ),
            LABELS,
            pair(&self.rx_packets, &self.tx_packets),
        )?;
        enc.family(
            &Meta::counter(
                "qcow_metal_net_bytes",
                "Bytes of frames through the guest's network interface, by direction.",
            )
            .unit("bytes"),
            LABELS,
            pair(&self.rx_bytes, &self.tx_bytes),
        )
    }
}
