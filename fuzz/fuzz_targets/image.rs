//! Arbitrary bytes as a qcow2 image on a fixed-size `MemDisk`: open read-only, walk the
//! virtual disk by block status and read what it says holds data (runs it says read as
//! zeros must), check, map and space; then open for repair, repair, and check again: what
//! the repair leaves must agree with what the check finds, and a repaired image must take
//! a write, read it back, and stay consistent (or be made so by a second repair). Errors are fine; panics and unbounded memory are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow_metal::block::MemDisk;
use qcow_metal::disk::{Allocation, VirtualDisk};
use qcow_metal::qcow2::{OpenOptions, Qcow2};

/// Most bytes of data the walk reads per input, and most block-status calls.
const READ_BUDGET: u64 = 4 << 20;
const STATUS_CALLS: u32 = 4096;

/// Compared against in pieces (a `memcmp`, not an instrumented per-byte loop).
static ZEROS: [u8; 512] = [0; 512];

fn options(read_only: bool, repair: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        repair,
        l2_cache_bytes: 64 << 10,
        refcount_cache_bytes: 64 << 10,
        // Check and repair walk every cluster the refcount structures can describe, up to
        // this much memory: kept small so hostile images do not slow the fuzzer down.
        check_memory_limit: 4 << 20,
        ..OpenOptions::default()
    }
}

fn walk(q: &mut Qcow2<MemDisk>) {
    let size = q.size();
    let mut buf = vec![0u8; 65536];
    let mut budget = READ_BUDGET;
    let mut off = 0;
    for _ in 0..STATUS_CALLS {
        if off >= size {
            break;
        }
        let len = (size - off).min(1 << 30);
        let Ok(ext) = q.block_status(off, len) else {
            // A damaged table: step over one cluster.
            off += q.cluster_size().min(size - off);
            continue;
        };
        assert!(ext.len > 0 && ext.len <= len, "{ext:?} for {len} bytes");
        let n = ext.len.min(buf.len() as u64).min(budget);
        if n > 0 && q.read(off, &mut buf[..n as usize]).is_ok() && ext.kind != Allocation::Data {
            assert!(
                buf[..n as usize]
                    .chunks(512)
                    .all(|c| c == &ZEROS[..c.len()]),
                "block status says {:?} at {off}, the bytes are not zeros",
                ext.kind
            );
        }
        budget -= n;
        off += ext.len;
    }
}

fn run(data: &[u8]) {
    if let Ok(mut q) = Qcow2::open(
        MemDisk::from_bytes(data.to_vec(), true),
        options(true, false),
    ) {
        walk(&mut q);
        let _ = q.check();
        let _ = q.map();
        let _ = q.space();
        let _ = format!("{:?}", q.info());
    }
    // Writable, with room to grow: repair, then use what it left.
    let mut bytes = data.to_vec();
    bytes.resize(data.len() + (256 << 10), 0);
    if let Ok(mut q) = Qcow2::open(MemDisk::from_bytes(bytes, true), options(false, true)) {
        if let Ok(rep) = q.repair() {
            let again = q.check().expect("check after a repair");
            assert!(
                again.corruptions <= rep.corruptions,
                "repair said {} corruptions remain, check finds {}:\n{rep}\n--\n{again}",
                rep.corruptions,
                again.corruptions
            );
            if rep.is_clean() {
                assert!(again.is_clean(), "repair said clean, check says:\n{again}");
                let size = q.size();
                if size > 0 {
                    let off = size / 2;
                    let n = (size - off).min(3000);
                    let w = vec![0x5a; n as usize];
                    if q.write(off, &w).is_ok() {
                        let mut r = vec![0u8; n as usize];
                        q.read(off, &mut r).expect("read back after a repair");
                        assert!(r == w, "a write after a repair did not read back");
                        q.flush().expect("flush after a repair");
                        let after = q.check().expect("check after a repair and a write");
                        // Clusters two active entries share (the repair counted both, as
                        // qemu-img check -r does) keep one reference after a write copies
                        // the other, without the COPIED flag: reported, as QEMU's own write
                        // leaves it too (src/qcow2/tests/fuzz_found.rs); harmless, and a
                        // repair fixes it. Nothing else may appear.
                        for m in after.messages.iter().filter(|m| m.starts_with("ERROR")) {
                            assert!(
                                m.contains("OFLAG_COPIED") && m.ends_with("refcount=1"),
                                "after a repair and a write:\n{after}"
                            );
                        }
                        assert_eq!(after.check_errors, 0, "{after}");
                        let fixed = q.repair().expect("a second repair");
                        assert!(fixed.is_clean(), "a second repair left:\n{fixed}");
                        let mut r2 = vec![0u8; n as usize];
                        q.read(off, &mut r2).expect("read after a second repair");
                        assert!(r2 == w, "a second repair changed the data");
                    }
                }
            }
        }
        let _ = q.close();
    }
}

fuzz_target!(|data: &[u8]| run(data));
