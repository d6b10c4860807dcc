//! Helpers shared by the engine tests: QEMU tool runners and small image builders.

use crate::block::{BlockDevice, BlockError, FileDisk, MemDisk};
use crate::qcow2::{CheckReport, CreateOptions, OpenOptions, Qcow2};
use std::path::Path;
use std::process::Command;

/// Runs a QEMU tool, failing the test with the Debian package name if it is missing.
pub fn qemu(tool: &str, args: &[&str]) -> std::process::Output {
    match Command::new(tool).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run `{tool}` ({e}): install the Debian package `qemu-utils` (it provides qemu-img and qemu-io)"
        ),
    }
}

/// Runs a QEMU tool and asserts it succeeded; returns stdout.
pub fn qemu_ok(tool: &str, args: &[&str]) -> String {
    let o = qemu(tool, args);
    assert!(
        o.status.success(),
        "{tool} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Reads an integer field from `qemu-img check --output=json` (absent: 0).
pub fn json_u64(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\":");
    let Some(at) = json.find(&pat) else {
        return 0;
    };
    json[at + pat.len()..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or(0)
}

/// `qemu-img check` of a file: asserts no corruptions, leaks or check errors.
pub fn assert_qemu_clean(path: &Path) {
    let o = qemu(
        "qemu-img",
        &[
            "check",
            "--output=json",
            "-f",
            "qcow2",
            path.to_str().unwrap(),
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        json_u64(&out, "corruptions"),
        0,
        "qemu-img check corruptions: {out}{err}"
    );
    assert_eq!(
        json_u64(&out, "leaks"),
        0,
        "qemu-img check leaks: {out}{err}"
    );
    assert_eq!(
        json_u64(&out, "check-errors"),
        0,
        "qemu-img check errors: {out}{err}"
    );
    assert!(o.status.success(), "qemu-img check failed: {out}{err}");
}

/// Creates an image in memory.
pub fn mem_image(size: u64, cluster: u64, refcount_bits: u32) -> Qcow2<MemDisk> {
    Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: size,
            cluster_size: cluster,
            refcount_bits,
            ..CreateOptions::default()
        },
    )
    .expect("create")
}

/// Small caches, to exercise eviction.
pub fn small_cache() -> OpenOptions {
    OpenOptions {
        l2_cache_bytes: 0,
        refcount_cache_bytes: 0,
        ..OpenOptions::default()
    }
}

/// Writes a memory disk's bytes to a file.
pub fn save(disk: &MemDisk, path: &Path) {
    std::fs::write(path, disk.bytes()).expect("write image file");
}

/// Opens a file image.
pub fn open_file(path: &Path, opts: OpenOptions) -> Qcow2<FileDisk> {
    Qcow2::open(
        FileDisk::open(path, opts.read_only).expect("open file"),
        opts,
    )
    .expect("open image")
}

/// `qemu-io -f qcow2 -c CMD... IMG`, asserting that every command succeeded.
pub fn qemu_io_image(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img.to_str().unwrap());
    let out = qemu_ok("qemu-io", &args);
    assert!(!out.contains("failed"), "{out}");
}

/// `qemu-img create -q -f qcow2 -o <options> <path> <size>`.
pub fn qemu_create(path: &Path, options: &str, size: u64) {
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            options,
            path.to_str().unwrap(),
            &size.to_string(),
        ],
    );
}

/// The guest view of a qcow2 file as `qemu-img convert -O raw` gives it (converted into
/// `dir`).
pub fn qemu_raw(dir: &Path, img: &Path) -> Vec<u8> {
    let raw = dir.join("conv.raw");
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(&raw).unwrap()
}

/// Writes `model` to a raw file in `dir` and asserts that `qemu-img compare` finds the
/// qcow2 file `img` equal to it; `what` names the moment in the failure message.
pub fn assert_qemu_compare(dir: &Path, img: &Path, model: &[u8], what: &str) {
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    let o = qemu(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-img check --output=json` of a file: its JSON report (whatever the exit status).
pub fn qemu_check_json(path: &Path) -> String {
    let o = qemu(
        "qemu-img",
        &["check", "--output=json", path.to_str().unwrap()],
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts that our check's summary (total and allocated clusters, image end) equals
/// QEMU's JSON report.
pub fn assert_summary_eq_qemu(r: &CheckReport, json: &str) {
    assert_eq!(r.total_clusters, json_u64(json, "total-clusters"), "{json}");
    assert_eq!(
        r.allocated_clusters,
        json_u64(json, "allocated-clusters"),
        "{json}"
    );
    assert_eq!(
        r.image_end_offset,
        json_u64(json, "image-end-offset"),
        "{json}"
    );
}

/// Asserts that the incrementally kept space counters equal a full walk.
pub fn assert_space_kept<D: BlockDevice>(q: &mut Qcow2<D>) {
    let kept = q.space().unwrap();
    assert_eq!(
        kept,
        q.space_walk().unwrap(),
        "incremental space accounting drifted"
    );
}

/// Options for a read-only open.
pub fn read_only() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

/// A memory disk that counts what is written to it: bytes written, and bytes and requests
/// of write-zeroes. Everything else goes straight to the disk (`zeroes_from` included).
#[derive(Clone)]
pub struct Counting {
    pub disk: MemDisk,
    pub written: u64,
    pub zeroed: u64,
    pub zero_requests: u64,
}

impl Counting {
    /// Counts from zero on `disk`.
    pub fn new(disk: MemDisk) -> Self {
        Counting {
            disk,
            written: 0,
            zeroed: 0,
            zero_requests: 0,
        }
    }
}

impl BlockDevice for Counting {
    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.disk.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.written += buf.len() as u64;
        self.disk.write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.disk.flush()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.zeroed += len;
        self.zero_requests += 1;
        self.disk.write_zeroes(offset, len)
    }
    fn zeroes_from(&self) -> Option<u64> {
        self.disk.zeroes_from()
    }
}
