//! Plain counters of the NBD export, kept by the connections and mapped to metric families
//! by the metrics layer.

use crate::disk::DiskError;

/// A transmission command, as counted in [`NbdStats::requests`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Any command this server does not know.
    Other,
}

impl Command {
    /// Number of variants (length of [`NbdStats::requests`]).
    pub const COUNT: usize = 8;
    /// Every variant, in index order.
    pub const ALL: [Command; Command::COUNT] = [
        Command::Read,
        Command::Write,
        Command::Disconnect,
        Command::Flush,
        Command::Trim,
        Command::WriteZeroes,
        Command::BlockStatus,
        Command::Other,
    ];

    /// The command of a wire command type.
    pub fn from_wire(kind: u16) -> Command {
        use super::proto::*;
        match kind {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disconnect,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            _ => Command::Other,
        }
    }

    /// Index into [`NbdStats::requests`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// A short lower-case name, suitable as a metric label value.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disconnect => "disc",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
            Command::Other => "other",
        }
    }
}

/// An NBD error value sent to a client, as counted in [`NbdStats::errors`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NbdError {
    /// `EPERM` (1): write to a read-only export.
    Perm,
    /// `EIO` (5): the disk or the image failed.
    Io,
    /// `EINVAL` (22): bad request (range, flags, command).
    Invalid,
    /// `ENOSPC` (28): no space, or a write past the end of the export.
    NoSpace,
    /// `EOVERFLOW` (75): a request too large for the reply it asks for.
    Overflow,
    /// `ENOTSUP` (95): the operation is not supported (fast zero).
    NotSupported,
    /// `ESHUTDOWN` (108): the server is shutting down.
    Shutdown,
}

impl NbdError {
    /// Number of variants (length of [`NbdStats::errors`]).
    pub const COUNT: usize = 7;
    /// Every variant, in index order.
    pub const ALL: [NbdError; NbdError::COUNT] = [
        NbdError::Perm,
        NbdError::Io,
        NbdError::Invalid,
        NbdError::NoSpace,
        NbdError::Overflow,
        NbdError::NotSupported,
        NbdError::Shutdown,
    ];

    /// The value on the wire.
    pub fn code(self) -> u32 {
        match self {
            NbdError::Perm => 1,
            NbdError::Io => 5,
            NbdError::Invalid => 22,
            NbdError::NoSpace => 28,
            NbdError::Overflow => 75,
            NbdError::NotSupported => 95,
            NbdError::Shutdown => 108,
        }
    }

    /// The error of a wire value (`None` for 0 or an unknown value).
    pub fn from_code(code: u32) -> Option<NbdError> {
        NbdError::ALL.into_iter().find(|e| e.code() == code)
    }

    /// Index into [`NbdStats::errors`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The errno name (`"EINVAL"`), suitable as a metric label value.
    pub fn name(self) -> &'static str {
        match self {
            NbdError::Perm => "EPERM",
            NbdError::Io => "EIO",
            NbdError::Invalid => "EINVAL",
            NbdError::NoSpace => "ENOSPC",
            NbdError::Overflow => "EOVERFLOW",
            NbdError::NotSupported => "ENOTSUP",
            NbdError::Shutdown => "ESHUTDOWN",
        }
    }
}

impl From<DiskError> for NbdError {
    fn from(e: DiskError) -> Self {
        match e {
            DiskError::Invalid => NbdError::Invalid,
            DiskError::ReadOnly => NbdError::Perm,
            DiskError::NoSpace => NbdError::NoSpace,
            DiskError::Corrupt(_) | DiskError::Device(_) => NbdError::Io,
            DiskError::Unsupported => NbdError::NotSupported,
        }
    }
}

/// Counters of one NBD export, summed over its connections. Counts are exact: a request is
/// counted once, when its header has been received; failed requests are also counted in
/// `errors`, and bytes only for requests that succeeded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// Connections open now (handshake or transmission).
    pub connections_active: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Connections that reached the transmission phase.
    pub sessions_total: u64,
    /// Connections closed because the client broke the protocol (bad magic, bad flags,
    /// unknown export in `NBD_OPT_EXPORT_NAME`, oversized option).
    pub protocol_errors: u64,
    /// Requests by [`Command`] (index with [`Command::index`]).
    pub requests: [u64; Command::COUNT],
    /// Error replies by [`NbdError`] (index with [`NbdError::index`]).
    pub errors: [u64; NbdError::COUNT],
    /// Bytes sent to clients by successful reads.
    pub bytes_read: u64,
    /// Bytes written by successful writes.
    pub bytes_written: u64,
    /// Bytes covered by successful trims.
    pub bytes_trimmed: u64,
    /// Bytes covered by successful write-zeroes.
    pub bytes_zeroed: u64,
}

impl NbdStats {
    /// Requests of one command.
    pub fn requests_of(&self, cmd: Command) -> u64 {
        self.requests[cmd.index()]
    }

    /// Error replies with one code.
    pub fn errors_of(&self, err: NbdError) -> u64 {
        self.errors[err.index()]
    }

    /// Adds `other`'s counters to these (the figures of several connections counted apart,
    /// summed for the export).
    pub fn add(&mut self, other: &NbdStats) {
        self.connections_active += other.connections_active;
        self.connections_total += other.connections_total;
        self.sessions_total += other.sessions_total;
        self.protocol_errors += other.protocol_errors;
        for (a, b) in self.requests.iter_mut().zip(other.requests) {
            *a += b;
        }
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        self.bytes_read += other.bytes_read;
        self.bytes_written += other.bytes_written;
        self.bytes_trimmed += other.bytes_trimmed;
        self.bytes_zeroed += other.bytes_zeroed;
    }

    /// All error replies.
    pub fn errors_total(&self) -> u64 {
        self.errors.iter().sum()
    }
}
