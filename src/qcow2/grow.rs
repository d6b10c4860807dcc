//! A device that grows on demand (a host file the runner resizes, see [`crate::hostfile`]):
//! the allocator asks it for room when a new cluster would lie past its end, and the guest
//! asks for room ahead of need in idle time ([`Qcow2::keep_headroom`]), or for a cut when
//! far more than a step lies past the image's end (after compaction, or a file extended by
//! an older runner).

use super::Qcow2;
use super::layout::max_image_len;
use crate::block::BlockDevice;
use crate::hostfile::{cut_request, growth_step, headroom_request, want_for};

impl<D: BlockDevice> Qcow2<D> {
    /// Takes the device's capacity as it is now: a device that grew lets the allocator use
    /// the new clusters, one that was cut keeps it below its end. Returns whether it grew.
    pub(crate) fn refresh_capacity(&mut self) -> bool {
        let cap = self.dev.capacity();
        let cs = self.geo.cluster_size();
        if cap / cs == self.dev_clusters {
            return false;
        }
        let grew = cap / cs > self.dev_clusters;
        self.dev_clusters = cap / cs;
        // Reads past the device's end read zeros: a span past it is harmless.
        self.dev_span = self.dev_span.max(cap.div_ceil(cs));
        grew
    }

    /// The most host bytes this image can ever need.
    fn max_len(&self) -> u64 {
        max_image_len(
            self.hdr.size,
            self.geo.cluster_size(),
            1 << self.geo.refcount_order,
        )
    }

    /// Makes clusters below `end_cluster` fit on the device: takes a capacity that grew
    /// meanwhile, else asks the device to grow (a step ahead) and waits for it. Whether
    /// they fit now.
    pub(crate) fn grow_to(&mut self, end_cluster: u64) -> bool {
        if end_cluster <= self.dev_clusters || self.refresh_capacity() {
            return end_cluster <= self.dev_clusters;
        }
        let cs = self.geo.cluster_size();
        let need = end_cluster.saturating_mul(cs);
        let want = want_for(need, growth_step(self.hdr.size, cs), self.max_len());
        self.dev.grow(need, want, true);
        self.refresh_capacity();
        end_cluster <= self.dev_clusters
    }

    /// Growth ahead of need, for idle time: once this session has allocated clusters (an
    /// image that is not written to keeps its file as it is) and less than half a growth
    /// step is left past the image's end, asks the device for a step more without waiting;
    /// either way takes a capacity that changed (`grow(0, 0, false)`). When more than two
    /// steps lie past the image's end, asks for a cut to the end plus a step (waiting for
    /// the answer). Cheap unless it cuts: nothing is read.
    pub fn keep_headroom(&mut self) {
        let cs = self.geo.cluster_size();
        let step = growth_step(self.hdr.size, cs);
        let writable = !self.read_only && !self.corrupt && !self.repairing;
        let ask = if !writable || self.stats.clusters_allocated == 0 {
            None
        } else {
            headroom_request(
                self.image_extent(),
                self.dev.capacity(),
                step,
                self.max_len(),
            )
        };
        let (need, want) = ask.unwrap_or((0, 0));
        self.dev.grow(need, want, false);
        self.refresh_capacity();
        if writable && ask.is_none() {
            self.cut_tail(step);
        }
    }

    /// Cuts the device to the image's end plus `step` when more than two steps lie past the
    /// end. The end comes from the refcounts (every cluster in use, pending frees included,
    /// has a nonzero refcount in the cache); the allocator stops below the new length before
    /// the device is asked, so nothing is written past it.
    fn cut_tail(&mut self, step: u64) {
        let cs = self.geo.cluster_size();
        let cap = self.dev.capacity();
        // The allocator's end may only be high: check it first, it costs nothing.
        if cut_request(self.image_extent(), cap, step).is_none() {
            return;
        }
        let Ok(end) = self.compute_end() else {
            return;
        };
        // Exact or high, as the allocator's end must be; next time the cheap check agrees.
        self.end = end;
        let Some(len) = cut_request(end.saturating_mul(cs), cap, step) else {
            return;
        };
        self.dev_clusters = self.dev_clusters.min(len / cs);
        self.dev.cut(len);
        self.refresh_capacity();
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CreateOptions, OpenOptions, Qcow2};
    use crate::block::{BlockDevice, BlockError, MemDisk, check_range};
    use crate::disk::{DiskError, VirtualDisk};
    use crate::hostfile::growth_step;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A fixed-size device that grows when asked, up to `limit` bytes (a host file on a
    /// filesystem with that much room); records what was asked.
    struct Growing {
        disk: MemDisk,
        cap: u64,
        limit: Rc<Cell<u64>>,
        asked: Vec<(u64, u64, bool)>,
        /// `grow(0, 0, false)` calls: looks at the capacity.
        looks: usize,
        /// Lengths the device was cut to.
        cuts: Vec<u64>,
    }

    impl BlockDevice for Growing {
        fn capacity(&self) -> u64 {
            self.cap
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            check_range(offset, buf.len() as u64, self.cap)?;
            self.disk.read_at(offset, buf)
        }
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
            check_range(offset, buf.len() as u64, self.cap)?;
            self.disk.write_at(offset, buf)
        }
        fn flush(&mut self) -> Result<(), BlockError> {
            Ok(())
        }
        fn cut(&mut self, len: u64) -> bool {
            self.cuts.push(len);
            self.cap = self.cap.min(len);
            true
        }
        fn grow(&mut self, need: u64, want: u64, wait: bool) -> bool {
            if (need, want, wait) == (0, 0, false) {
                self.looks += 1;
                return true;
            }
            self.asked.push((need, want, wait));
            let room = self.limit.get().min(want);
            if room >= need.max(self.cap) {
                self.cap = room;
            }
            self.cap >= need
        }
    }

    const MIB: u64 = 1 << 20;

    fn image(limit: Rc<Cell<u64>>) -> Qcow2<Growing> {
        let opts = CreateOptions {
            virtual_size: 1 << 30,
            ..CreateOptions::default()
        };
        let q = Qcow2::create(MemDisk::growable(), &opts).unwrap();
        // The file as the runner leaves it: cut at the image's end (tables included).
        let extent = q.image_extent();
        let mut bytes = q.close().unwrap().into_bytes();
        bytes.resize(extent as usize, 0);
        let len = extent;
        let dev = Growing {
            disk: MemDisk::from_bytes(bytes, false),
            cap: len,
            limit,
            asked: Vec::new(),
            looks: 0,
            cuts: Vec::new(),
        };
        Qcow2::open(dev, OpenOptions::default()).unwrap()
    }

    #[test]
    fn writes_past_the_device_end_wait_for_growth_a_step_ahead() {
        let mut q = image(Rc::new(Cell::new(u64::MAX)));
        let start = q.device().capacity();
        assert!(start < MIB, "a fresh image is small: {start}");
        // Idle and unwritten: no growth asked for, only a look at the capacity.
        q.keep_headroom();
        assert!(q.device().asked.is_empty());
        assert_eq!(q.device().looks, 1);
        let data = vec![0x5au8; 4 * MIB as usize];
        q.write(0, &data).unwrap();
        let asked = q.device().asked.clone();
        assert_eq!(asked.len(), 1, "{asked:?}");
        let (need, want, wait) = asked[0];
        assert!(wait && need > start, "{asked:?}");
        assert_eq!(want - need, growth_step(1 << 30, 65536));
        // A step ahead: more writes need no growth.
        q.write(8 * MIB, &data).unwrap();
        assert_eq!(q.device().asked.len(), 1);
        let mut back = vec![0u8; data.len()];
        q.read(8 * MIB, &mut back).unwrap();
        assert_eq!(back, data);
        // Near the end of the step: idle time asks for more, without waiting.
        let cap = q.device().capacity();
        let mut off = 16 * MIB;
        while q.image_extent() + growth_step(1 << 30, 65536) / 2 <= cap {
            q.write(off, &data).unwrap();
            off += data.len() as u64;
        }
        assert_eq!(q.device().asked.len(), 1);
        q.keep_headroom();
        let asked = q.device().asked.clone();
        assert_eq!(asked.len(), 2, "{asked:?}");
        assert_eq!(asked[1].0, 0);
        assert!(!asked[1].2);
        assert!(q.device().capacity() > cap);
        // The image stays sound and closes clean.
        let report = q.check().unwrap();
        assert!(report.is_clean(), "{report}");
        q.close().unwrap();
    }

    #[test]
    fn a_device_far_longer_than_the_image_is_cut_to_its_end_plus_a_step() {
        let mut q = image(Rc::new(Cell::new(u64::MAX)));
        let step = growth_step(1 << 30, 65536);
        let data = vec![0x3cu8; 4 * MIB as usize];
        q.write(0, &data).unwrap();
        // As an older runner left it: the file extended to the most the image can need.
        let long = super::max_image_len(1 << 30, 65536, 16);
        q.dev.cap = long;
        q.keep_headroom();
        let extent = q.image_extent();
        assert_eq!(q.device().cuts, [extent + step]);
        assert_eq!(q.device().capacity(), extent + step);
        // Nothing more to cut; writes go on below the new end.
        q.keep_headroom();
        assert_eq!(q.device().cuts.len(), 1);
        q.write(200 * MIB, &data).unwrap();
        assert_eq!(q.device().capacity(), extent + step);
        let mut back = vec![0u8; data.len()];
        for off in [0, 200 * MIB] {
            q.read(off, &mut back).unwrap();
            assert_eq!(back, data, "at {off}");
        }
        let report = q.check().unwrap();
        assert!(report.is_clean(), "{report}");
        q.close().unwrap();
    }

    #[test]
    fn a_device_that_cannot_grow_gives_no_space_and_keeps_the_image_sound() {
        let limit = Rc::new(Cell::new(6 * MIB));
        let mut q = image(limit.clone());
        let data = vec![0xa5u8; MIB as usize];
        let mut written = 0;
        let err = loop {
            match q.write(written * MIB, &data) {
                Ok(()) => written += 1,
                Err(e) => break e,
            }
            assert!(written < 64, "no error on a 6 MiB device");
        };
        assert_eq!(err, DiskError::NoSpace);
        assert!(written >= 4, "only {written} MiB fit");
        // Asked once for a step, granted partly; then refused.
        assert!(q.device().asked.len() >= 2, "{:?}", q.device().asked);
        let mut back = vec![0u8; data.len()];
        for i in 0..written {
            q.read(i * MIB, &mut back).unwrap();
            assert_eq!(back, data, "block {i}");
        }
        // More room later: the same write succeeds.
        limit.set(64 * MIB);
        q.write(written * MIB, &data).unwrap();
        let report = q.check().unwrap();
        assert_eq!(report.corruptions, 0, "{report}");
        q.close().unwrap();
    }
}
