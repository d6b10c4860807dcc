//! The host file follows the image: the runner grows the disk's file when the guest asks,
//! and cuts it back to the image's end after a clean shutdown.
//!
//! The guest prints `qcow-metal: grow-device SEQ NEED WANT` on its console
//! ([`qcow_metal::hostfile::GrowRequest`]) when its qcow2 engine needs room past the end of
//! the file (a write waits for it) or nears it (ahead of need). A [`spawn_grower`] thread
//! reads the console as it comes, decides how far the file may grow ([`grant`]: up to what
//! the guest wants, never past what the image can ever need, never past the free space of
//! the filesystem), resizes it with QMP `block_resize` on a QMP socket of its own, and
//! answers on QEMU's stdin, which is the guest's serial input (`grow SEQ ok LEN` or
//! `grow SEQ failed`: the guest's write then gets `ENOSPC`). When the image's end has fallen
//! far below the file's (compaction in the guest, or a file extended by an older runner), the
//! guest asks for a cut (`qcow-metal: cut-device SEQ LEN`, having stopped allocating past
//! `LEN`), and the grower shrinks the file the same way.
//!
//! After QEMU exits cleanly, [`cut_to_extent`] opens the image with the project's engine,
//! checks it, and truncates the file to the image's end (`qemu-img check`'s image end
//! offset), so that `ls -l` shows what the image holds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ChildStdin;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qcow_metal::block::FileDisk;
use qcow_metal::hostfile::{CutRequest, GrowReply, GrowRequest};
use qcow_metal::qcow2::{OpenOptions, Qcow2};

use crate::console::{Console, Wait};
use crate::qmp::Qmp;
use crate::units::format_size;

/// The `-drive` id of the guest's disk (see [`crate::qemu::QemuConfig::args`]).
pub const DRIVE_ID: &str = "disk0";

/// How long the same refusal is not repeated on stderr.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The length the file may grow to for `req`, given its length now, the free space of its
/// filesystem (`None`: unknown) and the most the image can ever need (`max_len`): what the
/// guest wants, cut to the free space and to `max_len`, in whole 512-byte sectors, and at
/// least what it needs; the file's length when it need not grow. An error says why the
/// guest cannot have what it needs.
pub fn grant(
    req: &GrowRequest,
    current_len: u64,
    free: Option<u64>,
    max_len: u64,
) -> Result<u64, String> {
    if req.need > max_len {
        return Err(format!(
            "the guest asked for {} bytes, more than the image can ever need ({} bytes)",
            req.need, max_len
        ));
    }
    let room = free.map_or(u64::MAX, |f| current_len.saturating_add(f));
    let target = req.want.min(max_len).min(room) / 512 * 512;
    let target = target.max(req.need);
    if target <= current_len {
        return Ok(current_len);
    }
    if target > room {
        return Err(format!(
            "it needs {} more but the filesystem has {} free",
            format_size(req.need - current_len),
            format_size(free.unwrap_or(0)),
        ));
    }
    Ok(target)
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`, if it says.
fn free_space(path: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// What a grower thread works on.
#[derive(Debug, Clone)]
pub struct GrowerConfig {
    /// The image file.
    pub disk: PathBuf,
    /// The QMP socket it uses (its own: QEMU serves one client per socket).
    pub qmp_socket: PathBuf,
    /// The most the image can ever need ([`qcow_metal::qcow2::max_image_len`]).
    pub max_len: u64,
}

/// Starts a thread that answers the guest's grow requests (see the module docs) until the
/// console ends.
pub fn spawn_grower(console: Console, stdin: ChildStdin, config: GrowerConfig) -> JoinHandle<()> {
    std::thread::spawn(move || Grower::new(stdin, config).run(&console))
}

struct Grower {
    stdin: ChildStdin,
    config: GrowerConfig,
    qmp: Option<Qmp>,
    last_warning: Option<(Instant, String)>,
}

impl Grower {
    fn new(stdin: ChildStdin, config: GrowerConfig) -> Self {
        Grower {
            stdin,
            config,
            qmp: None,
            last_warning: None,
        }
    }

    fn run(mut self, console: &Console) {
        let mut index = 0;
        loop {
            match console.line_at(index, Duration::from_secs(3600)) {
                Wait::Found(_, line) => {
                    index += 1;
                    let reply = if let Some(req) = GrowRequest::parse(&line) {
                        Some(self.answer(&req))
                    } else {
                        CutRequest::parse(&line).map(|req| self.answer_cut(&req))
                    };
                    if let Some(reply) = reply {
                        let sent =
                            writeln!(self.stdin, "{reply}").and_then(|()| self.stdin.flush());
                        if sent.is_err() {
                            return; // QEMU is gone
                        }
                    }
                }
                Wait::TimedOut => {}
                Wait::Closed => return,
            }
        }
    }

    fn answer(&mut self, req: &GrowRequest) -> GrowReply {
        let failed = GrowReply::Failed { seq: req.seq };
        let path = self.config.disk.clone();
        let current = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) => {
                self.warn(format!("cannot read its length: {e}"));
                return failed;
            }
        };
        let target = match grant(req, current, free_space(&path), self.config.max_len) {
            Ok(t) => t,
            Err(why) => {
                self.warn(why);
                return failed;
            }
        };
        if target > current
            && let Err(e) = self.resize(target)
        {
            self.warn(format!("QMP block_resize to {target} bytes failed: {e}"));
            return failed;
        }
        let len = std::fs::metadata(&path).map_or(target, |m| m.len());
        GrowReply::Grown { seq: req.seq, len }
    }

    /// A cut: the guest uses nothing at or past `req.len` (it owns the image); the length
    /// must be whole sectors.
    fn answer_cut(&mut self, req: &CutRequest) -> GrowReply {
        let failed = GrowReply::Failed { seq: req.seq };
        let path = self.config.disk.clone();
        let Ok(current) = std::fs::metadata(&path).map(|m| m.len()) else {
            return failed;
        };
        if req.len == 0 || !req.len.is_multiple_of(512) {
            self.warn(format!("the guest asked for a cut to {} bytes", req.len));
            return failed;
        }
        if req.len < current
            && let Err(e) = self.resize(req.len)
        {
            self.warn(format!("QMP block_resize to {} bytes failed: {e}", req.len));
            return failed;
        }
        let len = std::fs::metadata(&path).map_or(req.len, |m| m.len());
        GrowReply::Grown { seq: req.seq, len }
    }

    fn resize(&mut self, size: u64) -> crate::Result<()> {
        if self.qmp.is_none() {
            self.qmp = Some(Qmp::connect(&self.config.qmp_socket)?);
        }
        let result = self
            .qmp
            .as_mut()
            .map_or(Ok(()), |q| q.block_resize(DRIVE_ID, size));
        if result.is_err() {
            // Reconnect next time: the session may be what failed.
            self.qmp = None;
        }
        result
    }

    /// Says on stderr why the guest's disk cannot grow (the same reason at most every
    /// [`WARN_EVERY`]).
    fn warn(&mut self, why: String) {
        if let Some((at, last)) = &self.last_warning
            && *last == why
            && at.elapsed() < WARN_EVERY
        {
            return;
        }
        eprintln!(
            "qcow-metal: warning: cannot grow {} for the guest: {why}; its writes that need \
             new space get ENOSPC (free space there, or move the disk with --disk)",
            self.config.disk.display()
        );
        self.last_warning = Some((Instant::now(), why));
    }
}

/// What [`cut_to_extent`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// The file was cut from `from` to `to` bytes.
    Cut {
        /// Its length before.
        from: u64,
        /// Its length now (the image's end).
        to: u64,
    },
    /// The file ends at the image's end already.
    AtEnd(u64),
    /// Left as it is, for this reason (a dirty or damaged image).
    Kept(String),
}

/// Cuts the qcow2 image at `path` to its end: opened read-only with the project's engine and
/// checked, the file is truncated to the end of the last cluster in use (the image end
/// offset `qemu-img check` reports) when the image is clean and nothing past that end is
/// referenced. A dirty image (refcounts may be stale) or a damaged one is kept as it is.
pub fn cut_to_extent(path: &Path) -> std::io::Result<Cut> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let from = file.metadata()?.len();
    let dev = FileDisk::from_file(file.try_clone()?, true);
    let opts = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let mut image = match Qcow2::open(dev, opts) {
        Ok(i) => i,
        Err(e) => return Ok(Cut::Kept(format!("the image does not open: {e}"))),
    };
    // Incompatible bits 0 (dirty: refcounts may be stale) and 1 (corrupt).
    if image.header().incompatible_features & 0b11 != 0 {
        return Ok(Cut::Kept("the image is dirty or marked corrupt".into()));
    }
    let report = match image.check() {
        Ok(r) => r,
        Err(e) => return Ok(Cut::Kept(format!("the check failed: {e}"))),
    };
    if report.corruptions != 0 || report.check_errors != 0 {
        return Ok(Cut::Kept(format!(
            "the check found {} corruptions and {} errors",
            report.corruptions, report.check_errors
        )));
    }
    let cs = image.cluster_size();
    let to = report.image_end_offset.max(image.image_extent()).max(cs);
    drop(image);
    if from <= to {
        return Ok(Cut::AtEnd(from));
    }
    file.set_len(to)?;
    file.sync_all()?;
    Ok(Cut::Cut { from, to })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn req(need: u64, want: u64) -> GrowRequest {
        GrowRequest { seq: 1, need, want }
    }

    #[test]
    fn growth_is_granted_up_to_the_free_space_and_the_largest_image() {
        let max = 1300 * MIB;
        // Plenty of room: what the guest wants.
        assert_eq!(
            grant(&req(MIB, 129 * MIB), MIB / 2, Some(10 << 30), max),
            Ok(129 * MIB)
        );
        // Free space unknown: the same.
        assert_eq!(
            grant(&req(MIB, 129 * MIB), MIB / 2, None, max),
            Ok(129 * MIB)
        );
        // Never past the largest image.
        assert_eq!(grant(&req(0, 2000 * MIB), 1200 * MIB, None, max), Ok(max));
        // A small filesystem: what fits, in whole sectors, if it covers the need.
        assert_eq!(
            grant(&req(2 * MIB, 130 * MIB), MIB, Some(40 * MIB + 100), max),
            Ok(41 * MIB)
        );
        // Not even the need fits: refused, saying how much is free.
        let err = grant(&req(41 * MIB, 130 * MIB), 40 * MIB, Some(MIB / 2), max).unwrap_err();
        assert!(err.contains("512 KiB free"), "{err}");
        // Ahead of need on a full filesystem: no growth, no error.
        assert_eq!(
            grant(&req(0, 130 * MIB), 40 * MIB, Some(0), max),
            Ok(40 * MIB)
        );
        // Already long enough: nothing to do.
        assert_eq!(
            grant(&req(MIB, 2 * MIB), 4 * MIB, Some(0), max),
            Ok(4 * MIB)
        );
        // A hostile request past anything the image can need.
        let err = grant(&req(u64::MAX, u64::MAX), MIB, None, max).unwrap_err();
        assert!(err.contains("more than the image can ever need"), "{err}");
    }

    #[test]
    fn a_clean_image_is_cut_to_its_end_and_a_dirty_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        crate::disk::create_qcow2(&path, 64 * MIB, 65536, 16).unwrap();
        // Some data, then a file much longer than the image (as a grown file is).
        let run = |args: &[&str]| {
            let out = std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .expect("qemu-io/qemu-img missing: install the Debian package qemu-utils");
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let p = path.to_str().unwrap();
        run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 3M", p]);
        let end = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(100 * MIB)
            .unwrap();
        let cut = cut_to_extent(&path).unwrap();
        let Cut::Cut { from, to } = cut else {
            panic!("not cut: {cut:?}")
        };
        assert_eq!(from, 100 * MIB);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), to);
        let check = run(&["qemu-img", "check", "--output=json", "-f", "qcow2", p]);
        let v: serde_json::Value = serde_json::from_str(&check).unwrap();
        assert_eq!(v["image-end-offset"].as_u64(), Some(to), "{check}");
        assert!(to <= end.div_ceil(65536) * 65536, "{to} > {end}");
        assert_eq!(cut_to_extent(&path).unwrap(), Cut::AtEnd(to));
        // A dirty image keeps its file.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[79] |= 1;
        bytes.resize(100 * MIB as usize, 0);
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(cut_to_extent(&path).unwrap(), Cut::Kept(_)));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 100 * MIB);
    }
}
