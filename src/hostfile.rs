//! The host file follows the image: how a guest asks the runner to grow its disk, and how
//! much it asks for.
//!
//! QEMU gives the guest the image file's bytes as a virtio-blk device whose capacity is the
//! file's length. The runner does not pre-extend the file; when the qcow2 engine needs room
//! past the device's end, the guest prints a [`GrowRequest`] line on its serial console,
//! which the runner reads. The runner grows the file with QMP `block_resize` (QEMU then
//! raises virtio-blk's configuration-change interrupt and the capacity reads larger) and
//! answers on the console's input with a [`GrowReply`]: `ok` with the new length, or
//! `failed` (a filesystem without room for it, a resize QEMU refused), which the engine
//! turns into `NoSpace` (NBD `ENOSPC`). When the image's end has fallen far below the
//! device's (compaction, or a file extended by an older runner), the guest asks for a cut
//! with a [`CutRequest`] (after it stopped allocating past the new length), answered the same
//! way. At a clean shutdown the runner cuts the file back to the image's end.
//!
//! The policy ([`growth_step`], [`headroom_request`]): the guest asks ahead of need, in
//! steps of `max(64 MiB, virtual size / 8)`, when less than half a step is left past the
//! image's end, so writes rarely wait for a growth; never past the largest length the
//! image can reach ([`crate::qcow2::max_image_len`]).

use core::fmt;

/// The start of a grow request on the guest's console.
pub const REQUEST_PREFIX: &str = "qcow-metal: grow-device ";
/// The start of a cut request on the guest's console.
pub const CUT_PREFIX: &str = "qcow-metal: cut-device ";
/// The start of the runner's answer on the console's input.
pub const REPLY_PREFIX: &str = "grow ";
/// The smallest growth step: 64 MiB.
pub const MIN_STEP: u64 = 64 << 20;

/// A guest's request to make its device longer: `qcow-metal: grow-device SEQ NEED WANT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrowRequest {
    /// Numbers requests; the reply carries it.
    pub seq: u64,
    /// The device must be at least this long (bytes) for the waiting write to go on; 0
    /// when nothing waits (growth ahead of need).
    pub need: u64,
    /// The length the guest would like (bytes, at least `need`).
    pub want: u64,
}

impl GrowRequest {
    /// Parses a console line; `None` for any other line or a malformed request.
    pub fn parse(line: &str) -> Option<GrowRequest> {
        let rest = line.trim_end().strip_prefix(REQUEST_PREFIX)?;
        let mut f = rest.split(' ');
        let seq = f.next()?.parse().ok()?;
        let need = f.next()?.parse().ok()?;
        let want: u64 = f.next()?.parse().ok()?;
        if f.next().is_some() || want < need {
            return None;
        }
        Some(GrowRequest { seq, need, want })
    }
}

impl fmt::Display for GrowRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{REQUEST_PREFIX}{} {} {}",
            self.seq, self.need, self.want
        )
    }
}

/// A guest's request to make its device shorter: `qcow-metal: cut-device SEQ LEN`. Nothing
/// the image uses lies at or past `LEN`, and the guest allocates nothing there any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutRequest {
    /// Numbers requests (shared with [`GrowRequest`]); the reply carries it.
    pub seq: u64,
    /// The length to cut the device to (bytes).
    pub len: u64,
}

impl CutRequest {
    /// Parses a console line; `None` for any other line or a malformed request.
    pub fn parse(line: &str) -> Option<CutRequest> {
        let rest = line.trim_end().strip_prefix(CUT_PREFIX)?;
        let (seq, len) = rest.split_once(' ')?;
        Some(CutRequest {
            seq: seq.parse().ok()?,
            len: len.parse().ok()?,
        })
    }
}

impl fmt::Display for CutRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{CUT_PREFIX}{} {}", self.seq, self.len)
    }
}

/// The runner's answer to a [`GrowRequest`] or a [`CutRequest`], a line on the console's
/// input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrowReply {
    /// `grow SEQ ok LEN`: the file is now `LEN` bytes long.
    Grown {
        /// The request's number.
        seq: u64,
        /// The file's length now.
        len: u64,
    },
    /// `grow SEQ failed`: the file could not grow (the runner says why on its stderr).
    Failed {
        /// The request's number.
        seq: u64,
    },
}

impl GrowReply {
    /// The request this answers.
    pub fn seq(&self) -> u64 {
        match *self {
            GrowReply::Grown { seq, .. } | GrowReply::Failed { seq } => seq,
        }
    }

    /// Parses a line of the console's input; `None` for anything else.
    pub fn parse(line: &str) -> Option<GrowReply> {
        let rest = line.trim_end().strip_prefix(REPLY_PREFIX)?;
        let mut f = rest.split(' ');
        let seq = f.next()?.parse().ok()?;
        let reply = match (f.next()?, f.next()) {
            ("ok", Some(len)) => GrowReply::Grown {
                seq,
                len: len.parse().ok()?,
            },
            ("failed", None) => GrowReply::Failed { seq },
            _ => return None,
        };
        f.next().is_none().then_some(reply)
    }
}

impl fmt::Display for GrowReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            GrowReply::Grown { seq, len } => write!(f, "{REPLY_PREFIX}{seq} ok {len}"),
            GrowReply::Failed { seq } => write!(f, "{REPLY_PREFIX}{seq} failed"),
        }
    }
}

/// How much the device grows at a time: `max(64 MiB, virtual_size / 8)`, a whole number of
/// clusters.
pub fn growth_step(virtual_size: u64, cluster_size: u64) -> u64 {
    let cs = cluster_size.max(512);
    (virtual_size / 8)
        .max(MIN_STEP)
        .div_ceil(cs)
        .saturating_mul(cs)
}

/// The length to ask for when the device must be at least `need` bytes long: `need` plus a
/// step, never past `max_len`.
pub fn want_for(need: u64, step: u64, max_len: u64) -> u64 {
    need.saturating_add(step).min(max_len.max(need))
}

/// Growth ahead of need: with the image ending at `extent` on a device of `capacity`
/// bytes, `Some((need, want))` when less than half a `step` is left past the end and the
/// device may still grow (`capacity < max_len`); `need` is 0 (nothing waits).
pub fn headroom_request(extent: u64, capacity: u64, step: u64, max_len: u64) -> Option<(u64, u64)> {
    if capacity >= max_len || capacity.saturating_sub(extent) >= step / 2 {
        return None;
    }
    let want = want_for(extent, step, max_len);
    (want > capacity).then_some((0, want))
}

/// A cut while running: with the image ending at `extent` on a device of `capacity` bytes,
/// `Some(len)` (the end plus a step) when more than two steps lie past the end.
pub fn cut_request(extent: u64, capacity: u64, step: u64) -> Option<u64> {
    let len = extent.saturating_add(step);
    (capacity > len.saturating_add(step)).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn requests_and_replies_round_trip_and_junk_is_refused() {
        let r = GrowRequest {
            seq: 7,
            need: 1 << 20,
            want: 129 << 20,
        };
        let line = r.to_string();
        assert_eq!(line, "qcow-metal: grow-device 7 1048576 135266304");
        assert_eq!(GrowRequest::parse(&line), Some(r));
        assert_eq!(GrowRequest::parse(&(line.clone() + "\r")), Some(r));
        for bad in [
            "qcow-metal: grow-device 7 1048576",
            "qcow-metal: grow-device 7 1048576 135266304 9",
            "qcow-metal: grow-device x 1 2",
            "qcow-metal: grow-device 1 5 4",
            "qcow-metal: grow-device -1 1 2",
            "[ 0.1] qcow-metal: grow-device 1 1 2",
            "qcow-metal: grow-device 1 99999999999999999999999 2",
        ] {
            assert_eq!(GrowRequest::parse(bad), None, "{bad}");
        }
        for reply in [
            GrowReply::Grown { seq: 3, len: 4096 },
            GrowReply::Failed { seq: 4 },
        ] {
            assert_eq!(GrowReply::parse(&reply.to_string()), Some(reply));
        }
        assert_eq!(GrowReply::Failed { seq: 4 }.to_string(), "grow 4 failed");
        let cut = CutRequest { seq: 9, len: 65536 };
        assert_eq!(cut.to_string(), "qcow-metal: cut-device 9 65536");
        assert_eq!(CutRequest::parse(&cut.to_string()), Some(cut));
        for bad in [
            "qcow-metal: cut-device 9",
            "qcow-metal: cut-device 9 1 2",
            "qcow-metal: cut-device x 1",
            "qcow-metal: grow-device 9 1 2",
        ] {
            assert_eq!(CutRequest::parse(bad), None, "{bad}");
            assert!(GrowRequest::parse(bad).is_none() || bad.contains("grow"));
        }
        assert_eq!(GrowReply::Grown { seq: 3, len: 9 }.seq(), 3);
        for bad in [
            "grow 1 ok",
            "grow 1 failed 2",
            "grow 1 ok 2 3",
            "grow x failed",
            "ok",
        ] {
            assert_eq!(GrowReply::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_device_grows_in_steps_ahead_of_need_and_never_past_the_largest_image() {
        const MIB: u64 = 1 << 20;
        // 1 GiB: an eighth; small disks: 64 MiB; whole clusters.
        assert_eq!(growth_step(1 << 30, 65536), 128 * MIB);
        assert_eq!(growth_step(8 * MIB, 65536), 64 * MIB);
        assert_eq!(growth_step((1 << 30) + 8, 2 << 20) % (2 << 20), 0);
        let max = 1300 * MIB;
        assert_eq!(want_for(10 * MIB, 128 * MIB, max), 138 * MIB);
        assert_eq!(want_for(1250 * MIB, 128 * MIB, max), max);
        // A need past the largest image is asked for as it is (the runner refuses it).
        assert_eq!(want_for(2000 * MIB, 128 * MIB, max), 2000 * MIB);
        // Plenty left: nothing; less than half a step: ask for the end plus a step.
        assert_eq!(headroom_request(10 * MIB, 138 * MIB, 128 * MIB, max), None);
        assert_eq!(
            headroom_request(100 * MIB, 138 * MIB, 128 * MIB, max),
            Some((0, 228 * MIB))
        );
        // Cuts: only when more than two steps lie past the end, to the end plus a step.
        assert_eq!(cut_request(10 * MIB, 138 * MIB, 128 * MIB), None);
        assert_eq!(cut_request(10 * MIB, 266 * MIB, 128 * MIB), None);
        assert_eq!(cut_request(MIB, 1300 * MIB, 128 * MIB), Some(129 * MIB));
        // Already at the largest size: nothing more to ask.
        assert_eq!(headroom_request(1299 * MIB, max, 128 * MIB, max), None);
        assert_eq!(
            headroom_request(1250 * MIB, 1260 * MIB, 128 * MIB, max),
            Some((0, max))
        );
    }
}
