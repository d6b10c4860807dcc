//! Pipeline tests: the qcow2 engine (and raw mode) on a [`MemQueue`] that completes
//! requests out of order, against a model of what the disk must read back.

use super::pipeline::{DiskOp, Finished, Pipeline, QueuedDisk};
use super::queue::{BlockQueue, CompletionOrder, MemQueue};
use crate::block::MemDisk;
use crate::disk::{DiskError, RawDisk, VirtualDisk};
use crate::qcow2::{CreateOptions, OpenOptions, Qcow2};
use alloc::vec;
use alloc::vec::Vec;

const SIZE: u64 = 8 << 20;
const CS: u64 = 65536;

fn engine(order: CompletionOrder, depth: usize) -> Qcow2<MemQueue<MemDisk>> {
    Qcow2::create(
        MemQueue::new(MemDisk::growable(), depth, order),
        &CreateOptions {
            virtual_size: SIZE,
            cluster_size: CS,
            ..CreateOptions::default()
        },
    )
    .unwrap()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 ^ seed.wrapping_mul(31)) as u8 | 1)
        .collect()
}

/// A write without FUA.
fn write_op(offset: u64, data: Vec<u8>) -> DiskOp {
    DiskOp::Write {
        offset,
        data,
        fua: false,
    }
}

/// Runs the pipeline until every request finished; returns them in finishing order.
fn drain<D: QueuedDisk>(p: &mut Pipeline, disk: &mut D) -> Vec<Finished> {
    let mut out = Vec::new();
    for _ in 0..100_000 {
        p.run(disk);
        while let Some(f) = p.next_finished() {
            out.push(f);
        }
        if p.is_idle() {
            return out;
        }
    }
    panic!("the pipeline did not finish");
}

#[test]
fn reads_and_overwrites_overlap_and_finish_out_of_order() {
    let mut disk = engine(CompletionOrder::Shuffled(7), 32);
    // Allocate the first 2 MiB through the engine (the synchronous path).
    let mut model = vec![0u8; SIZE as usize];
    let base = pattern(2 << 20, 1);
    disk.write(0, &base).unwrap();
    model[..base.len()].copy_from_slice(&base);

    let mut p = Pipeline::new();
    let mut rng = fastrand::Rng::with_seed(0x1234_5678);
    let mut expected_reads = Vec::new();
    // 64 requests of 4 KiB, at distinct blocks (so no two conflict), half writes.
    let mut blocks: Vec<u64> = (0..512).collect();
    for tag in 0..64u64 {
        let i = rng.usize(..blocks.len());
        let off = blocks.swap_remove(i) * 4096;
        if tag % 2 == 0 {
            let data = pattern(4096, tag + 100);
            model[off as usize..off as usize + 4096].copy_from_slice(&data);
            p.submit(
                tag,
                DiskOp::Write {
                    offset: off,
                    data,
                    fua: false,
                },
            );
        } else {
            expected_reads.push((tag, model[off as usize..off as usize + 4096].to_vec()));
            p.submit(
                tag,
                DiskOp::Read {
                    offset: off,
                    len: 4096,
                },
            );
        }
    }
    let done = drain(&mut p, &mut disk);
    assert_eq!(done.len(), 64);
    assert!(done.iter().all(|f| f.result.is_ok() && f.queued));
    // Several in flight on the device, and replies not in submission order.
    let q = disk.device();
    assert!(q.max_in_flight >= 16, "max in flight {}", q.max_in_flight);
    assert!(p.stats().max_in_flight >= 16);
    let tags: Vec<u64> = done.iter().map(|f| f.tag).collect();
    assert!(
        tags.windows(2).any(|w| w[0] > w[1]),
        "finished in order: {tags:?}"
    );
    for (tag, want) in expected_reads {
        let f = done.iter().find(|f| f.tag == tag).unwrap();
        assert_eq!(f.data, want, "read {tag}");
    }
    // Everything reads back as the model says, and the image is consistent.
    let mut back = vec![0u8; SIZE as usize];
    disk.read(0, &mut back).unwrap();
    assert!(back == model);
    assert!(disk.check().unwrap().is_clean());
}

#[test]
fn allocating_writes_and_flushes_are_barriers() {
    let mut disk = engine(CompletionOrder::Lifo, 8);
    disk.write(0, &pattern(CS as usize, 3)).unwrap();
    disk.device_mut_for_tests().step = Some(0);
    let mut p = Pipeline::new();
    p.submit(1, write_op(0, pattern(4096, 4)));
    p.submit(
        2,
        DiskOp::Read {
            offset: 8192,
            len: 4096,
        },
    );
    // Into unallocated space: must wait for 1 and 2.
    p.submit(3, write_op(CS * 4, pattern(4096, 5)));
    p.submit(4, DiskOp::Flush);
    p.run(&mut disk);
    assert_eq!(p.in_flight(), 2);
    assert_eq!(
        p.waiting(),
        2,
        "the allocating write waits for the requests in flight"
    );
    assert_eq!(p.next_finished(), None);
    let flushes = disk.device().device().flushes;
    disk.device_mut_for_tests().advance(1);
    p.run(&mut disk);
    assert_eq!(
        p.next_finished().map(|f| f.tag),
        Some(2),
        "LIFO: the read first"
    );
    assert_eq!(p.waiting(), 2);
    disk.device_mut_for_tests().advance(1);
    p.run(&mut disk);
    let order: Vec<(u64, bool)> = core::iter::from_fn(|| p.next_finished())
        .map(|f| (f.tag, f.queued))
        .collect();
    assert_eq!(order, [(1, true), (3, false), (4, false)]);
    assert!(disk.device().device().flushes > flushes);
    assert!(p.is_idle());
    let mut back = vec![0u8; 4096];
    disk.read(CS * 4, &mut back).unwrap();
    assert_eq!(back, pattern(4096, 5));
    assert!(disk.check().unwrap().is_clean());
}

#[test]
fn overlapping_requests_wait_for_each_other() {
    let mut disk = engine(CompletionOrder::Lifo, 8);
    disk.write(0, &pattern(CS as usize, 3)).unwrap();
    disk.device_mut_for_tests().step = Some(0);
    let mut p = Pipeline::new();
    p.submit(1, write_op(0, vec![0xaa; 8192]));
    p.submit(2, write_op(4096, vec![0xbb; 4096]));
    p.submit(
        3,
        DiskOp::Read {
            offset: 0,
            len: 8192,
        },
    );
    p.run(&mut disk);
    assert_eq!((p.in_flight(), p.waiting()), (1, 2));
    disk.device_mut_for_tests().step = None;
    let done = drain(&mut p, &mut disk);
    let tags: Vec<u64> = done.iter().map(|f| f.tag).collect();
    assert_eq!(tags, [1, 2, 3]);
    assert_eq!(&done[2].data[..4096], &[0xaa; 4096][..]);
    assert_eq!(&done[2].data[4096..], &[0xbb; 4096][..]);
    assert!(p.stats().conflicts > 0);
}

#[test]
fn reads_of_holes_and_zeros_need_no_device_request() {
    let mut disk = engine(CompletionOrder::Fifo, 8);
    disk.write(CS, &pattern(4096, 9)).unwrap();
    let submitted = disk.device().submitted;
    let mut p = Pipeline::new();
    // A hole, then a read across the hole/data border.
    p.submit(
        1,
        DiskOp::Read {
            offset: 0,
            len: 8192,
        },
    );
    p.submit(
        2,
        DiskOp::Read {
            offset: CS - 4096,
            len: 8192,
        },
    );
    let done = drain(&mut p, &mut disk);
    assert_eq!(done[0].data, vec![0; 8192]);
    assert_eq!(&done[1].data[..4096], &[0; 4096][..]);
    assert_eq!(&done[1].data[4096..], &pattern(4096, 9)[..]);
    assert_eq!(
        disk.device().submitted,
        submitted + 1,
        "only the data piece is queued"
    );
}

#[test]
fn unaligned_and_fua_requests_take_the_engine_path() {
    let mut disk = engine(CompletionOrder::Fifo, 8);
    disk.write(0, &pattern(CS as usize, 3)).unwrap();
    let mut p = Pipeline::new();
    p.submit(1, write_op(100, vec![7; 300]));
    p.submit(
        2,
        DiskOp::Write {
            offset: 4096,
            data: vec![8; 4096],
            fua: true,
        },
    );
    p.submit(
        3,
        DiskOp::Read {
            offset: 100,
            len: 300,
        },
    );
    let done = drain(&mut p, &mut disk);
    assert!(done.iter().all(|f| f.result.is_ok() && !f.queued));
    assert_eq!(done[2].data, vec![7; 300]);
    assert_eq!(p.stats().synchronous, 3);
}

#[test]
fn errors_come_back_with_their_request() {
    let mut disk = engine(CompletionOrder::Fifo, 8);
    let mut p = Pipeline::new();
    p.submit(
        1,
        DiskOp::Read {
            offset: SIZE,
            len: 4096,
        },
    );
    p.submit(
        2,
        DiskOp::Read {
            offset: 0,
            len: 4096,
        },
    );
    let done = drain(&mut p, &mut disk);
    assert_eq!(done[0].tag, 1);
    assert!(done[0].result.is_err());
    assert_eq!(done[1].result, Ok(()));
    // Read-only: writes are refused, reads still served.
    let dev = disk.close().unwrap();
    let mut ro = Qcow2::open(
        dev,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    p.submit(3, write_op(0, vec![1; 4096]));
    let done = drain(&mut p, &mut ro);
    assert_eq!(done[0].result, Err(DiskError::ReadOnly));
}

#[test]
fn raw_disks_queue_everything_aligned() {
    let mut disk = RawDisk::new(MemQueue::new(
        MemDisk::fixed(1 << 20),
        4,
        CompletionOrder::Lifo,
    ));
    let mut p = Pipeline::new();
    for i in 0..16u64 {
        p.submit(i, write_op(i * 4096, pattern(4096, i)));
    }
    let done = drain(&mut p, &mut disk);
    assert!(done.iter().all(|f| f.result.is_ok() && f.queued));
    assert_eq!(disk.device().max_in_flight, 4, "bounded by the queue depth");
    for i in 0..16u64 {
        p.submit(
            100 + i,
            DiskOp::Read {
                offset: i * 4096,
                len: 4096,
            },
        );
    }
    for f in drain(&mut p, &mut disk) {
        assert_eq!(f.data, pattern(4096, f.tag - 100));
    }
    assert_eq!(disk.queue().in_flight(), 0);
}

#[test]
fn a_power_cut_with_requests_in_flight_loses_nothing_flushed() {
    let mut disk = engine(CompletionOrder::Shuffled(3), 16);
    disk.write(0, &pattern(4 * CS as usize, 1)).unwrap();
    disk.flush().unwrap();
    let mut p = Pipeline::new();
    // Overwrites in place, then a flush: all durable once the flush finished.
    for i in 0..8u64 {
        p.submit(i, write_op(i * 8192, vec![0x11; 4096]));
    }
    p.submit(8, DiskOp::Flush);
    let done = drain(&mut p, &mut disk);
    assert_eq!(done.last().map(|f| f.tag), Some(8));
    assert!(done.iter().all(|f| f.result.is_ok()));
    // More overwrites and an allocating write, cut off before the device completes them.
    disk.device_mut_for_tests().step = Some(0);
    for i in 0..8u64 {
        p.submit(20 + i, write_op(i * 8192 + 4096, vec![0x22; 4096]));
    }
    p.submit(30, write_op(16 * CS, vec![0x33; 4096]));
    p.run(&mut disk);
    assert_eq!(p.in_flight(), 8);
    // Power cut: what the device holds now is all there is.
    let medium = disk.device().device().bytes().to_vec();
    drop(disk);
    let mut after =
        Qcow2::open(MemDisk::from_bytes(medium, false), OpenOptions::default()).unwrap();
    let report = after.check().unwrap();
    assert_eq!(report.corruptions, 0, "{report:?}");
    for i in 0..8u64 {
        let mut back = vec![0u8; 4096];
        after.read(i * 8192, &mut back).unwrap();
        assert_eq!(back, vec![0x11; 4096], "flushed write {i}");
        after.read(i * 8192 + 4096, &mut back).unwrap();
        let old = &pattern(4 * CS as usize, 1)[(i * 8192 + 4096) as usize..][..4096];
        assert!(
            back == old,
            "a write that never completed changed block {i}"
        );
    }
}

#[test]
fn writes_that_fill_new_clusters_overlap_and_are_referenced_when_they_land() {
    let mut disk = engine(CompletionOrder::Shuffled(11), 32);
    let mut model = vec![0u8; SIZE as usize];
    let mut p = Pipeline::new();
    // 48 writes of whole new clusters (1 or 2 clusters each) at distinct places, in a
    // shuffled order, beside 16 overwrites of a cluster allocated first.
    disk.write(0, &pattern(CS as usize, 1)).unwrap();
    model[..CS as usize].copy_from_slice(&pattern(CS as usize, 1));
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut slots: Vec<u64> = (1..(SIZE / CS) / 2).collect();
    for tag in 0..64u64 {
        let (off, data) = if tag % 4 == 0 {
            (tag / 4 * 4096, pattern(4096, tag))
        } else {
            let slot = slots.swap_remove(rng.usize(..slots.len()));
            let clusters = 1 + rng.u64(..2);
            (slot * 2 * CS, pattern((clusters * CS) as usize, tag))
        };
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        p.submit(tag, write_op(off, data));
    }
    let done = drain(&mut p, &mut disk);
    assert_eq!(done.len(), 64);
    assert!(
        done.iter().all(|f| f.result.is_ok() && f.queued),
        "{done:?}"
    );
    assert_eq!(p.stats().synchronous, 0);
    assert!(
        disk.device().max_in_flight >= 16,
        "max in flight {}",
        disk.device().max_in_flight
    );
    let mut back = vec![0u8; SIZE as usize];
    disk.read(0, &mut back).unwrap();
    assert!(back == model);
    disk.flush().unwrap();
    let report = disk.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
    // And as the image on the medium says after a clean close.
    let dev = disk.close().unwrap().into_inner();
    let mut again = Qcow2::open(dev, OpenOptions::default()).unwrap();
    again.read(0, &mut back).unwrap();
    assert!(back == model);
}

#[test]
fn only_whole_new_clusters_are_allocated_on_the_queue() {
    let mut disk = engine(CompletionOrder::Fifo, 8);
    let mut p = Pipeline::new();
    // Part of a new cluster: its rest must be zeroed, which the engine's write does.
    p.submit(1, write_op(CS, pattern(4096, 1)));
    // A whole cluster and half of the next: the engine's write too.
    p.submit(2, write_op(4 * CS, pattern((CS + CS / 2) as usize, 2)));
    // Whole clusters: queued.
    p.submit(3, write_op(8 * CS, pattern(2 * CS as usize, 3)));
    let done = drain(&mut p, &mut disk);
    let paths: Vec<(u64, bool)> = done.iter().map(|f| (f.tag, f.queued)).collect();
    assert_eq!(paths, [(1, false), (2, false), (3, true)]);
    let mut back = vec![0u8; CS as usize];
    disk.read(CS, &mut back).unwrap();
    assert_eq!(&back[..4096], &pattern(4096, 1)[..]);
    assert!(back[4096..].iter().all(|&b| b == 0));
    assert!(disk.check().unwrap().is_clean());
}

#[test]
fn a_failed_write_into_new_clusters_gives_them_back() {
    let mut disk = engine(CompletionOrder::Fifo, 8);
    disk.write(0, &pattern(CS as usize, 1)).unwrap();
    disk.flush().unwrap();
    let allocated = disk.stats().clusters_allocated;
    disk.device_mut_for_tests().step = Some(0);
    let mut p = Pipeline::new();
    p.submit(1, write_op(4 * CS, pattern(2 * CS as usize, 2)));
    p.run(&mut disk);
    assert_eq!(p.in_flight(), 1);
    assert_eq!(disk.stats().clusters_allocated, allocated + 2);
    // The device refuses the data.
    disk.device_mut_for_tests().device_mut().set_read_only(true);
    disk.device_mut_for_tests().advance(1);
    p.run(&mut disk);
    let f = p.next_finished().unwrap();
    assert!(f.result.is_err(), "{f:?}");
    disk.device_mut_for_tests()
        .device_mut()
        .set_read_only(false);
    disk.device_mut_for_tests().step = None;
    // Nothing points at the clusters, and they are free again after the write-back.
    let mut back = vec![1u8; 2 * CS as usize];
    disk.read(4 * CS, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    disk.flush().unwrap();
    let report = disk.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
    // The next write takes them.
    p.submit(2, write_op(6 * CS, pattern(CS as usize, 3)));
    assert!(drain(&mut p, &mut disk).iter().all(|f| f.result.is_ok()));
    assert!(disk.check().unwrap().is_clean());
}

/// Random requests on the pipeline, the power cut at random moments (with write-backs of
/// the engine's metadata while writes into new clusters are in flight): the image on the
/// medium has no corruption, every block not written since the last finished flush holds
/// its flushed value, and every other block holds its flushed value or one written since.
#[test]
fn power_cuts_with_new_clusters_in_flight_lose_nothing_flushed() {
    const BLOCK: u64 = 4096;
    let blocks = (SIZE / BLOCK) as usize;
    for seed in 0..24u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut disk = engine(CompletionOrder::Shuffled(seed), 16);
        disk.device_mut_for_tests().step = Some(0);
        let mut p = Pipeline::new();
        // Per block: the value a finished flush made durable, and the values written since.
        let mut durable: Vec<u64> = vec![0; blocks];
        let mut since: Vec<Vec<u64>> = vec![Vec::new(); blocks];
        // Writes submitted before a flush that is still pending: flush tag -> (block, value).
        let mut flush_covers: Vec<(u64, Vec<(usize, u64)>)> = Vec::new();
        let mut submitted: Vec<(usize, u64)> = Vec::new();
        let cut_at = rng.usize(20..120);
        let mut tag = 0u64;
        for step in 0..cut_at {
            match rng.u8(..10) {
                0..=5 => {
                    // A write of whole clusters or of a few blocks, each block a value.
                    let (first, n) = if rng.bool() {
                        let c = rng.u64(..SIZE / CS - 3);
                        (c * CS / BLOCK, rng.u64(1..4) * CS / BLOCK)
                    } else {
                        (rng.u64(..SIZE / BLOCK - 4), rng.u64(1..4))
                    };
                    let mut data = Vec::new();
                    for b in first..first + n {
                        tag += 1;
                        let v = tag;
                        data.extend(
                            (0..BLOCK).map(|i| (v.wrapping_mul(2654435761) >> (i % 24)) as u8),
                        );
                        since[b as usize].push(v);
                        submitted.push((b as usize, v));
                    }
                    p.submit(tag, write_op(first * BLOCK, data));
                }
                6 => {
                    tag += 1;
                    flush_covers.push((tag, core::mem::take(&mut submitted)));
                    p.submit(tag, DiskOp::Flush);
                }
                7 if rng.bool() => {
                    // A discard of whole clusters (a barrier; their clusters are reused).
                    let c = rng.u64(..SIZE / CS - 2);
                    let n = rng.u64(1..3);
                    for b in c * CS / BLOCK..(c + n) * CS / BLOCK {
                        since[b as usize].push(0);
                        submitted.push((b as usize, 0));
                    }
                    tag += 1;
                    p.submit(
                        tag,
                        DiskOp::Discard {
                            offset: c * CS,
                            len: n * CS,
                        },
                    );
                }
                7 => {
                    // The engine's metadata write-back while requests are in flight.
                    disk.flush_metadata().unwrap();
                }
                _ => {
                    let n = rng.usize(1..8);
                    disk.device_mut_for_tests().advance(n);
                }
            }
            p.run(&mut disk);
            while let Some(f) = p.next_finished() {
                assert!(f.result.is_ok(), "seed {seed} step {step}: {f:?}");
                if let Some(i) = flush_covers.iter().position(|(t, _)| *t == f.tag) {
                    // A flush covers what was submitted before it (all finished by now).
                    let (_, covered) = flush_covers.remove(i);
                    for (b, v) in covered {
                        durable[b] = v;
                    }
                }
            }
        }
        // Power cut.
        let medium = disk.device().device().bytes().to_vec();
        drop(disk);
        let mut after =
            Qcow2::open(MemDisk::from_bytes(medium, false), OpenOptions::default()).unwrap();
        let report = after.check().unwrap();
        assert_eq!(report.corruptions, 0, "seed {seed}: {report:?}");
        let mut back = vec![0u8; BLOCK as usize];
        for b in 0..blocks {
            after.read(b as u64 * BLOCK, &mut back).unwrap();
            let value_of = |v: u64| -> Vec<u8> {
                if v == 0 {
                    vec![0; BLOCK as usize]
                } else {
                    (0..BLOCK)
                        .map(|i| (v.wrapping_mul(2654435761) >> (i % 24)) as u8)
                        .collect()
                }
            };
            let ok = back == value_of(durable[b]) || since[b].iter().any(|&v| back == value_of(v));
            assert!(
                ok,
                "seed {seed}: block {b} lost its flushed value {}",
                durable[b]
            );
        }
    }
}
