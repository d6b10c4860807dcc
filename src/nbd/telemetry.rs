//! Telemetry of the NBD export (label `export`), written at scrape time straight from the
//! server's [`NbdStats`], with label values from [`Command`] and [`NbdError`].

use super::{Command, NbdError, NbdStats};
use crate::metrics::{Encoder, Meta, Value};
use core::fmt;

/// The commands whose bytes are counted (label `op` of `qcow_metal_nbd_bytes_total`).
const BYTE_COMMANDS: [Command; 4] = [
    Command::Read,
    Command::Write,
    Command::Trim,
    Command::WriteZeroes,
];

impl NbdStats {
    /// Bytes of successful requests of `cmd` (0 for commands that move no bytes).
    pub fn bytes_of(&self, cmd: Command) -> u64 {
        match cmd {
            Command::Read => self.bytes_read,
            Command::Write => self.bytes_written,
            Command::Trim => self.bytes_trimmed,
            Command::WriteZeroes => self.bytes_zeroed,
            _ => 0,
        }
    }

    /// Writes the export's families for the export `export`.
    pub fn encode(&self, enc: &mut Encoder<'_>, export: &str) -> fmt::Result {
        const EXPORT: &[&str; 1] = &["export"];
        let one = |v: u64| [([export], Value::U64(v))];
        enc.family(
            &Meta::gauge(
                "qcow_metal_nbd_connections_active",
                "NBD connections open now.",
            ),
            EXPORT,
            one(self.connections_active),
        )?;
        enc.family(
            &Meta::counter("qcow_metal_nbd_connections", "NBD connections accepted."),
            EXPORT,
            one(self.connections_total),
        )?;
        enc.family(
            &Meta::counter(
                "qcow_metal_nbd_sessions",
                "NBD connections that completed the handshake.",
            ),
            EXPORT,
            one(self.sessions_total),
        )?;
        enc.family(
            &Meta::counter(
                "qcow_metal_nbd_protocol_errors",
                "NBD connections closed because the client broke the protocol.",
            ),
            EXPORT,
            one(self.protocol_errors),
        )?;
        enc.family(
            &Meta::counter(
                "qcow_metal_nbd_requests",
                "NBD requests answered, by command.",
            ),
            &["export", "command"],
            Command::ALL.map(|c| ([export, c.name()], Value::U64(self.requests_of(c)))),
        )?;
        enc.family(
            &Meta::counter("qcow_metal_nbd_errors", "NBD error replies, by error."),
            &["export", "error"],
            NbdError::ALL.map(|e| ([export, e.name()], Value::U64(self.errors_of(e)))),
        )?;
        enc.family(
            &Meta::counter(
                "qcow_metal_nbd_bytes",
                "Bytes covered by successful NBD requests, by operation.",
            )
            .unit("bytes"),
            &["export", "op"],
            BYTE_COMMANDS.map(|c| ([export, c.name()], Value::U64(self.bytes_of(c)))),
        )
    }
}
