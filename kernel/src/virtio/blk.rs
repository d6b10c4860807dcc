//! virtio-blk as a [`SectorDevice`], on `virtio-drivers`' PCI transport and virtqueue.
//!
//! `virtio-drivers` ships a block driver, but it negotiates neither discard nor write-zeroes
//! nor the device's segment limits, and moves one request at a time. This driver speaks the
//! request protocol itself (virtio 1.x, 5.2) on the crate's [`VirtQueue`]:
//!
//! - read, write, flush (`VIRTIO_BLK_F_FLUSH`), discard (`VIRTIO_BLK_F_DISCARD`) and
//!   write-zeroes (`VIRTIO_BLK_F_WRITE_ZEROES`); the read-only flag (`VIRTIO_BLK_F_RO`) makes
//!   every changing request fail with [`BlockError::ReadOnly`] before it reaches the device;
//! - a caller's buffer goes to the device in place (no copy): big requests are cut into
//!   chunks of at most [`plan::MAX_REQUEST_BYTES`] (and `seg_max` x `size_max` when the device sets
//!   them), and up to [`MAX_IN_FLIGHT`] chunks are queued before the device is notified once,
//!   so the host can work on them together;
//! - every virtio request submitted is counted exactly once in the [`BlockDeviceMetrics`]
//!   (requests, bytes, errors, latency, in flight), after splitting, as QEMU's
//!   `query-blockstats` counts them;
//! - a request the host fails (`VIRTIO_BLK_S_IOERR`: the runner gives QEMU
//!   `werror=report,rerror=report`, so a full host filesystem or a failing host disk ends
//!   here instead of pausing the VM) is [`BlockError::Io`] and an error of its operation in
//!   the metrics; the qcow2 engine decides what the client is told (`ENOSPC` for a write into
//!   new space, `EIO` otherwise).
//!
//! [`SectorDevice`] calls block (by polling the used ring) until every request they
//! submitted has completed. The same queue is also a [`BlockQueue`]: a queued request owns
//! its buffer (kept in its slot until the device is done with it), `submit` never waits,
//! `poll` collects completions, `wait` spins and halts like a call's wait. Up to
//! [`QUEUE_DEPTH`] queued requests and a call's [`MAX_IN_FLIGHT`] have slots of their own,
//! so the engine's synchronous metadata reads and writes run while queued requests are in
//! flight; a call that meets a queued request's completion keeps it for `poll`.
//!
//! The capacity can grow while the guest runs (the runner resizes the host file with QMP
//! `block_resize` when the guest asks, see [`crate::hostfile`]): QEMU then bumps the
//! configuration generation and raises the configuration-change interrupt (ISR bit 1);
//! [`VirtioBlk::refresh_capacity`] re-reads the capacity when either says so.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use log::{info, warn};
use qcow_metal::blkqueue::plan::{
    self, DeviceConfig, Limits, MAX_SEGMENTS, RequestType, Slots, VIRTIO_SECTOR,
};
use qcow_metal::blkqueue::queue::{BlockQueue, Completion, QueuedOp};
use qcow_metal::block::telemetry::{BlockDeviceMetrics, IoOp};
use qcow_metal::block::{BlockError, SectorDevice};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, InterruptStatus, Transport};

use super::KernelHal;
use crate::hostfile::{ANSWER_MS, Answer, Grower};

/// Descriptors in the request queue (QEMU offers 256; 128 leaves room for every chunk).
pub const QUEUE_SIZE: usize = 128;
/// Requests queued at once by one call.
pub const MAX_IN_FLIGHT: usize = 32;
/// Requests the [`BlockQueue`] side holds at once.
pub const QUEUE_DEPTH: usize = 32;
/// Request slots: a call's and the queue's never take each other's.
const SLOTS: usize = MAX_IN_FLIGHT + QUEUE_DEPTH;

const QUEUE: u16 = 0;
/// How long a wait for a completion spins before it halts the CPU. Under TCG a halted CPU
/// takes tens of microseconds to wake, more than most reads and writes take on the host
/// (measured: 4 KiB writes averaged ~300 us with a 20 us spin, ~150 us spinning), so only
/// long waits (flushes, big requests on a busy host) halt.
const SPIN_NS: u64 = 1_000_000;
/// Longest halt while waiting for a completion (a lost interrupt costs at most this).
const WAIT_SLICE_NS: u64 = 1_000_000;

// Feature bits (virtio 1.x, 5.2.3 and 6).
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_VERSION_1: u64 = 1 << 32;
// VIRTIO_F_EVENT_IDX is left out on purpose: virtio-drivers' `should_notify` compares ring
// indices without wrap-around, which can miss a notification after a batch of requests.
const WANTED: u64 = F_SIZE_MAX
    | F_SEG_MAX
    | F_RO
    | F_BLK_SIZE
    | F_FLUSH
    | F_DISCARD
    | F_WRITE_ZEROES
    | F_INDIRECT_DESC
    | F_VERSION_1;

/// Status value of a request the host failed (`VIRTIO_BLK_S_IOERR`), for the log.
const S_IOERR: u8 = 1;

// Offsets in the device configuration (5.2.4).
const CFG_CAPACITY: usize = 0;
const CFG_SIZE_MAX: usize = 8;
const CFG_SEG_MAX: usize = 12;
const CFG_BLK_SIZE: usize = 20;
const CFG_MAX_DISCARD_SECTORS: usize = 36;
const CFG_MAX_WRITE_ZEROES_SECTORS: usize = 48;

/// Why the device could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkInitError {
    /// The device does not offer `VIRTIO_F_VERSION_1` (legacy-only devices are not driven).
    NotModern,
    /// The device refused the negotiated features.
    FeaturesRefused,
    /// The request queue could not be set up.
    Queue(virtio_drivers::Error),
    /// The device configuration could not be read.
    Config(virtio_drivers::Error),
}

/// One chunk of a data transfer: `len` bytes at `ptr` for the device sector `sector`.
#[derive(Clone, Copy)]
struct Chunk {
    sector: u64,
    ptr: *mut u8,
    len: usize,
}

/// Whose request a slot holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The running [`SectorDevice`] call (its buffer is borrowed for the call).
    Call,
    /// A [`BlockQueue`] request with this tag (its buffer is the slot's `buf`).
    Queued(u64),
}

/// A request the device holds: the header and status buffers live here until it completes
/// (which slots are free, prepared or on the queue is kept in [`Slots`]).
struct Slot {
    header: [u8; 16],
    /// Discard/write-zeroes segment (sector, count, flags).
    range: [u8; 16],
    status: [u8; 1],
    op: IoOp,
    chunk: Chunk,
    /// Bytes the request covers, for statistics.
    bytes: u64,
    start_ns: u64,
    owner: Owner,
    /// A queued request's buffer (`chunk` points into it); empty for a call's request.
    buf: Vec<u8>,
}

impl Slot {
    const fn empty() -> Self {
        Slot {
            header: [0; 16],
            range: [0; 16],
            status: [0xff],
            op: IoOp::Read,
            chunk: Chunk {
                sector: 0,
                ptr: core::ptr::null_mut(),
                len: 0,
            },
            bytes: 0,
            start_ns: 0,
            owner: Owner::Call,
            buf: Vec::new(),
        }
    }

    /// A data-less request (flush, discard, write-zeroes).
    fn no_data(&mut self, op: IoOp, bytes: u64) {
        self.op = op;
        self.chunk = Chunk {
            sector: 0,
            ptr: core::ptr::null_mut(),
            len: 0,
        };
        self.bytes = bytes;
    }
}

/// The virtio request type of an operation.
fn request_type(op: IoOp) -> RequestType {
    match op {
        IoOp::Read => RequestType::Read,
        IoOp::Write => RequestType::Write,
        IoOp::Flush => RequestType::Flush,
        IoOp::Discard => RequestType::Discard,
        IoOp::WriteZeroes => RequestType::WriteZeroes,
    }
}

/// The virtio-blk driver.
pub struct VirtioBlk {
    transport: PciTransport,
    queue: VirtQueue<KernelHal, QUEUE_SIZE>,
    features: u64,
    /// Capacity in 512-byte virtio sectors.
    capacity: u64,
    /// What one request may carry (block size, segment and request sizes, range limits).
    limits: Limits,
    indirect: bool,
    slots: alloc::boxed::Box<[Slot; SLOTS]>,
    /// Which of `slots` are free, prepared or on the queue (and under which token).
    slot_states: Slots<SLOTS>,
    /// Queued requests on the device.
    queued_busy: usize,
    /// Queued requests completed and not yet collected by `poll`.
    ready: VecDeque<Completion>,
    /// Queued requests were added since the device was last notified.
    notify_pending: bool,
    stats: Arc<BlockDeviceMetrics>,
    clock_ns: fn() -> u64,
    /// Halts the CPU until an interrupt or a deadline, if the device can wake it.
    waiter: Option<fn(u64)>,
    /// The configuration generation the capacity was read at.
    config_generation: u32,
    /// The device raised its configuration-change interrupt since the capacity was read.
    config_changed: bool,
    /// Asks the runner to grow the host file (`grow=1`), if enabled.
    grower: Option<Grower>,
}

fn read_cfg<T: config::Cfg>(t: &PciTransport, offset: usize) -> Result<T, BlkInitError> {
    T::read(t, offset).map_err(BlkInitError::Config)
}

/// Typed reads of the device configuration (u32 and u64 fields).
mod config {
    use virtio_drivers::transport::Transport;
    use virtio_drivers::transport::pci::PciTransport;

    pub trait Cfg: Sized {
        fn read(t: &PciTransport, offset: usize) -> Result<Self, virtio_drivers::Error>;
    }
    impl Cfg for u32 {
        fn read(t: &PciTransport, offset: usize) -> Result<Self, virtio_drivers::Error> {
            t.read_config_space::<u32>(offset)
        }
    }
    impl Cfg for u64 {
        fn read(t: &PciTransport, offset: usize) -> Result<Self, virtio_drivers::Error> {
            // Two 32-bit halves, re-read while the configuration generation changes.
            t.read_consistent(|| {
                let lo = t.read_config_space::<u32>(offset)?;
                let hi = t.read_config_space::<u32>(offset + 4)?;
                Ok(u64::from(lo) | (u64::from(hi) << 32))
            })
        }
    }
}

impl VirtioBlk {
    /// Initialises the device behind `transport` (virtio 1.x, 3.1.1): feature negotiation,
    /// configuration, the request queue. `clock_ns` is a monotonic clock for latencies.
    pub fn new(
        mut transport: PciTransport,
        stats: Arc<BlockDeviceMetrics>,
        clock_ns: fn() -> u64,
    ) -> Result<Self, BlkInitError> {
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = transport.read_device_features();
        if offered & F_VERSION_1 == 0 {
            transport.set_status(DeviceStatus::FAILED);
            return Err(BlkInitError::NotModern);
        }
        let features = offered & WANTED;
        transport.write_driver_features(features);
        transport.set_status(
            DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK,
        );
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            transport.set_status(DeviceStatus::FAILED);
            return Err(BlkInitError::FeaturesRefused);
        }

        let config_generation = transport.read_config_generation();
        let capacity: u64 = read_cfg(&transport, CFG_CAPACITY)?;
        let field = |bit: u64, offset: usize| -> Result<Option<u32>, BlkInitError> {
            if features & bit != 0 {
                read_cfg::<u32>(&transport, offset).map(Some)
            } else {
                Ok(None)
            }
        };
        let limits = Limits::negotiate(DeviceConfig {
            blk_size: field(F_BLK_SIZE, CFG_BLK_SIZE)?,
            size_max: field(F_SIZE_MAX, CFG_SIZE_MAX)?,
            seg_max: field(F_SEG_MAX, CFG_SEG_MAX)?,
            max_discard_sectors: field(F_DISCARD, CFG_MAX_DISCARD_SECTORS)?,
            max_write_zeroes_sectors: field(F_WRITE_ZEROES, CFG_MAX_WRITE_ZEROES_SECTORS)?,
        });

        let indirect = features & F_INDIRECT_DESC != 0;
        let queue =
            VirtQueue::new(&mut transport, QUEUE, indirect, false).map_err(BlkInitError::Queue)?;
        // We poll the used ring; the device need not interrupt.
        let mut dev = VirtioBlk {
            transport,
            queue,
            features,
            capacity,
            limits,
            indirect,
            slots: alloc::boxed::Box::new([const { Slot::empty() }; SLOTS]),
            slot_states: Slots::default(),
            queued_busy: 0,
            ready: VecDeque::new(),
            notify_pending: false,
            stats,
            clock_ns,
            waiter: None,
            config_generation,
            config_changed: false,
            grower: None,
        };
        dev.queue.set_dev_notify(false);
        dev.transport.finish_init();
        dev.stats
            .set_capacity(capacity.saturating_mul(VIRTIO_SECTOR));
        info!(
            "{} bytes, block {} B, {}{}{}{}, up to {} KiB per request",
            capacity * VIRTIO_SECTOR,
            limits.block_size,
            if features & F_RO != 0 {
                "read-only"
            } else {
                "read-write"
            },
            if features & F_FLUSH != 0 {
                ", flush"
            } else {
                ""
            },
            if features & F_DISCARD != 0 {
                ", discard"
            } else {
                ""
            },
            if features & F_WRITE_ZEROES != 0 {
                ", write-zeroes"
            } else {
                ""
            },
            dev.limits.request_max / 1024,
        );
        Ok(dev)
    }

    /// The device's serial (`VIRTIO_BLK_T_GET_ID`, virtio 1.x 5.2.6: up to 20 bytes, the
    /// `serial=` QEMU was given), or `None` when it has none or the request fails. Call it
    /// before any other request is in flight (at bring-up).
    pub fn serial(&mut self) -> Option<String> {
        /// `VIRTIO_BLK_T_GET_ID`.
        const T_GET_ID: u32 = 8;
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&T_GET_ID.to_le_bytes());
        let mut id = [0u8; 20];
        let mut status = [0xffu8; 1];
        // SAFETY: the header, id and status buffers live on this stack frame until
        // `pop_used` below hands them back; nothing else touches them meanwhile.
        let token = unsafe {
            self.queue
                .add(&[&header[..]], &mut [&mut id[..], &mut status[..]])
        }
        .ok()?;
        if self.queue.should_notify() {
            self.transport.notify(QUEUE);
        }
        let used = self.wait_used();
        // SAFETY: the same buffers as passed to `add` for this token.
        let popped = unsafe {
            self.queue
                .pop_used(used, &[&header[..]], &mut [&mut id[..], &mut status[..]])
        };
        if used != token || popped.is_err() || status[0] != 0 {
            return None;
        }
        let len = id.iter().position(|&b| b == 0).unwrap_or(id.len());
        (len > 0).then(|| String::from_utf8_lossy(&id[..len]).into_owned())
    }

    /// Updates `stats` from now on (the disk's exported metrics, once the device is known
    /// to be the disk), starting with the capacity.
    pub fn set_stats(&mut self, stats: Arc<BlockDeviceMetrics>) {
        stats.set_capacity(self.capacity_bytes());
        self.stats = stats;
    }

    /// The metrics this device updates.
    pub fn stats(&self) -> &Arc<BlockDeviceMetrics> {
        &self.stats
    }

    /// Whether the device has a volatile write cache that [`SectorDevice::flush`] empties.
    pub fn has_flush(&self) -> bool {
        self.features & F_FLUSH != 0
    }

    fn blocks_to_virtio(&self, block: u64) -> u64 {
        block * self.limits.sectors_per_block()
    }

    fn check_blocks(&self, block: u64, count: u64) -> Result<u64, BlockError> {
        self.limits.check_blocks(block, count, self.capacity)
    }

    /// Puts the request in `slots[i]` on the queue. Returns `false` when the queue is full.
    fn submit_slot(&mut self, i: usize) -> Result<bool, BlockError> {
        let segs_max = self.limits.segment_max;
        let slot = &mut self.slots[i];
        let kind = request_type(slot.op);
        slot.header = plan::header(kind, slot.chunk.sector);
        slot.status[0] = 0xff;
        let chunk = slot.chunk;
        if self.queue.available_desc()
            < plan::descriptors_needed(kind, chunk.len, segs_max, self.indirect)
        {
            return Ok(false);
        }
        let slot = &mut self.slots[i];
        let mut data: heapless::Vec<&mut [u8], { MAX_SEGMENTS + 2 }> = heapless::Vec::new();
        // SAFETY: `chunk` describes part of the buffer that the running call owns for its
        // whole duration (see `run`), or a queued request's buffer, which stays in the slot
        // untouched until the completion is popped; the device is the only one to touch it
        // until the request is popped, and no other slice of it is alive meanwhile.
        unsafe { chunk_segments(chunk, segs_max, &mut data) };
        let token = match slot.op {
            IoOp::Read => {
                let _ = data.push(&mut slot.status[..]);
                // SAFETY: header, data segments and status stay valid and untouched until
                // `pop_used` returns them (slot storage is boxed and not reused until then).
                unsafe { self.queue.add(&[&slot.header[..]], &mut data[..]) }
            }
            IoOp::Write => {
                let mut inputs: heapless::Vec<&[u8], { MAX_SEGMENTS + 1 }> = heapless::Vec::new();
                let _ = inputs.push(&slot.header[..]);
                for seg in data.iter() {
                    let _ = inputs.push(&seg[..]);
                }
                // SAFETY: as above.
                unsafe { self.queue.add(&inputs, &mut [&mut slot.status[..]]) }
            }
            IoOp::Flush => {
                // SAFETY: as above.
                unsafe {
                    self.queue
                        .add(&[&slot.header[..]], &mut [&mut slot.status[..]])
                }
            }
            IoOp::Discard | IoOp::WriteZeroes => {
                // SAFETY: as above.
                unsafe {
                    self.queue.add(
                        &[&slot.header[..], &slot.range[..]],
                        &mut [&mut slot.status[..]],
                    )
                }
            }
        };
        let token = match token {
            Ok(t) => t,
            Err(virtio_drivers::Error::QueueFull) => return Ok(false),
            Err(e) => {
                warn!("cannot queue a request: {e}");
                return Err(BlockError::Io);
            }
        };
        self.slot_states.submitted(i, token);
        slot.start_ns = (self.clock_ns)();
        self.stats.submitted();
        Ok(true)
    }

    /// Waits for the device to complete a request: spins for [`SPIN_NS`] (completions of
    /// small requests usually arrive by then), then, if a waiter is set, halts the CPU until
    /// the device's interrupt or a short timeout.
    fn wait_used(&mut self) -> u16 {
        let start = (self.clock_ns)();
        loop {
            if let Some(t) = self.queue.peek_used() {
                return t;
            }
            match self.waiter {
                Some(wait) if (self.clock_ns)().saturating_sub(start) > SPIN_NS => {
                    // Deassert the interrupt line, then look again: a completion after this
                    // read raises the line anew and ends the halt at once.
                    self.ack();
                    if let Some(t) = self.queue.peek_used() {
                        return t;
                    }
                    wait((self.clock_ns)() + WAIT_SLICE_NS);
                }
                _ => core::hint::spin_loop(),
            }
        }
    }

    /// Lets the CPU halt while requests are outstanding: the device interrupts on every
    /// completion, and `waiter(deadline_ns)` halts until an interrupt or the deadline (the
    /// kernel routes the device's INTx to wake it).
    pub fn set_waiter(&mut self, waiter: fn(u64)) {
        self.queue.set_dev_notify(true);
        self.waiter = Some(waiter);
    }

    /// Reads (and so clears) the interrupt status, keeping a configuration change in mind.
    fn ack(&mut self) {
        let isr = self.transport.ack_interrupt();
        if isr.contains(InterruptStatus::DEVICE_CONFIGURATION_INTERRUPT) {
            self.config_changed = true;
        }
    }

    /// Lets the device ask the runner for a longer host file (the kernel's `grow=1`).
    pub fn enable_growth(&mut self) {
        self.grower = Some(Grower::new());
    }

    /// Re-reads the capacity when the device said its configuration changed (interrupt or
    /// generation); updates the capacity metric. Returns whether the capacity changed.
    pub fn refresh_capacity(&mut self) -> bool {
        if self.waiter.is_some() {
            // Also lowers a configuration-change interrupt (nothing is in flight here).
            self.ack();
        }
        let generation = self.transport.read_config_generation();
        if !self.config_changed && generation == self.config_generation {
            return false;
        }
        self.config_changed = false;
        self.config_generation = generation;
        match read_cfg::<u64>(&self.transport, CFG_CAPACITY) {
            Ok(sectors) if sectors != self.capacity => {
                info!(
                    "capacity now {} bytes (was {})",
                    sectors * VIRTIO_SECTOR,
                    self.capacity * VIRTIO_SECTOR
                );
                self.capacity = sectors;
                self.stats
                    .set_capacity(sectors.saturating_mul(VIRTIO_SECTOR));
                true
            }
            Ok(_) => false,
            Err(e) => {
                warn!("cannot re-read the capacity: {e:?}");
                false
            }
        }
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(VIRTIO_SECTOR)
    }

    /// [`SectorDevice::grow`]: asks the runner (see [`crate::hostfile`]) and, with `wait`,
    /// polls for the new capacity and the answer for at most [`ANSWER_MS`], halting the CPU
    /// in between (the configuration-change interrupt ends a halt).
    fn grow_host_file(&mut self, need: u64, want: u64, wait: bool) -> bool {
        self.refresh_capacity();
        let clock = self.clock_ns;
        let now_ms = move || clock() / 1_000_000;
        let Some(mut g) = self.grower.take() else {
            return self.capacity_bytes() >= need;
        };
        if g.poll(now_ms()) != Answer::None {
            // The answer may come before QEMU's configuration-change notice: read anyway.
            self.config_changed = true;
            self.refresh_capacity();
        }
        let cap = self.capacity_bytes();
        let ok = if !wait {
            if want > cap && g.may_ask_ahead(now_ms()) {
                g.send(need, want, now_ms());
            }
            cap >= need
        } else if cap >= need {
            true
        } else if g.silent(now_ms()) {
            false
        } else {
            if !g.pending_covers(need) {
                g.send(need, want, now_ms());
            }
            let deadline = now_ms() + ANSWER_MS + 100;
            loop {
                self.refresh_capacity();
                if self.capacity_bytes() >= need {
                    break true;
                }
                if now_ms() >= deadline {
                    break false;
                }
                match g.poll(now_ms()) {
                    Answer::Failed => break false,
                    // An answer that left the device short (to a request ahead of need):
                    // ask for what this write needs.
                    Answer::Grown(_) => {
                        self.config_changed = true;
                        self.refresh_capacity();
                        if self.capacity_bytes() < need {
                            g.send(need, want, now_ms());
                        }
                    }
                    Answer::None => match self.waiter {
                        Some(wait) => wait(clock() + WAIT_SLICE_NS),
                        None => core::hint::spin_loop(),
                    },
                }
            }
        };
        self.grower = Some(g);
        ok
    }

    /// [`SectorDevice::cut`]: asks the runner to cut the host file to `len` bytes (at most
    /// one request ahead of need at a time) and waits for the answer for at most
    /// [`ANSWER_MS`].
    fn cut_host_file(&mut self, len: u64) -> bool {
        self.refresh_capacity();
        let clock = self.clock_ns;
        let now_ms = move || clock() / 1_000_000;
        let Some(mut g) = self.grower.take() else {
            return self.capacity_bytes() <= len;
        };
        if self.capacity_bytes() > len && g.may_ask_ahead(now_ms()) {
            g.send_cut(len, now_ms());
            // `poll` gives up on the request after ANSWER_MS.
            while g.poll(now_ms()) == Answer::None {
                match self.waiter {
                    Some(wait) => wait(clock() + WAIT_SLICE_NS),
                    None => core::hint::spin_loop(),
                }
            }
            self.config_changed = true;
            self.refresh_capacity();
        }
        self.grower = Some(g);
        self.capacity_bytes() <= len
    }

    /// Waits for the next completed request and takes it off the used ring: returns the
    /// slot and status of a call's request, `None` for a queued request (kept for `poll`).
    fn complete_one(&mut self) -> Result<Option<(usize, u8)>, BlockError> {
        let token = self.wait_used();
        self.complete_token(token)
    }

    /// Takes the completed request `token` off the used ring (see [`Self::complete_one`]).
    fn complete_token(&mut self, token: u16) -> Result<Option<(usize, u8)>, BlockError> {
        let Some(i) = self.slot_states.find(token) else {
            warn!("the device completed an unknown request {token}");
            return Err(BlockError::Io);
        };
        let segs_max = self.limits.segment_max;
        let slot = &mut self.slots[i];
        let chunk = slot.chunk;
        let op = slot.op;
        let popped = {
            let mut inputs: heapless::Vec<&[u8], { MAX_SEGMENTS + 1 }> = heapless::Vec::new();
            let header = [&slot.header[..]];
            let header_range = [&slot.header[..], &slot.range[..]];
            let mut data: heapless::Vec<&mut [u8], { MAX_SEGMENTS + 2 }> = heapless::Vec::new();
            match op {
                IoOp::Read => {
                    // SAFETY: the same chunk as at submission: the rebuilt slices describe
                    // exactly the buffers that were queued, and the device has finished with
                    // them (the token is on the used ring).
                    unsafe { chunk_segments(chunk, segs_max, &mut data) };
                    // A plain array (no drop glue) for the call's single lifetime.
                    let mut outputs: [&mut [u8]; MAX_SEGMENTS + 2] =
                        core::array::from_fn(|_| <&mut [u8]>::default());
                    let mut n = 0;
                    for seg in data
                        .into_iter()
                        .chain(core::iter::once(&mut slot.status[..]))
                    {
                        outputs[n] = seg;
                        n += 1;
                    }
                    // SAFETY: the buffers are those passed to `add` for this token.
                    unsafe { self.queue.pop_used(token, &header, &mut outputs[..n]) }
                }
                IoOp::Write => {
                    let _ = inputs.push(&slot.header[..]);
                    // SAFETY: as for reads; the device only read these bytes.
                    unsafe { chunk_segments_ro(chunk, segs_max, &mut inputs) };
                    // SAFETY: as above.
                    unsafe {
                        self.queue
                            .pop_used(token, &inputs, &mut [&mut slot.status[..]])
                    }
                }
                // SAFETY: as above.
                IoOp::Flush => unsafe {
                    self.queue
                        .pop_used(token, &header, &mut [&mut slot.status[..]])
                },
                IoOp::Discard | IoOp::WriteZeroes => {
                    // SAFETY: as above.
                    unsafe {
                        self.queue
                            .pop_used(token, &header_range, &mut [&mut slot.status[..]])
                    }
                }
            }
        };
        let latency = (self.clock_ns)().saturating_sub(slot.start_ns);
        self.slot_states.release(i);
        self.stats.completed();
        let status = if popped.is_ok() { slot.status[0] } else { 0xff };
        self.stats.record(slot.op, slot.bytes, latency, status == 0);
        if let Err(e) = popped {
            warn!("bad completion: {e}");
        }
        let Owner::Queued(tag) = slot.owner else {
            return Ok(Some((i, status)));
        };
        slot.owner = Owner::Call;
        let data = core::mem::take(&mut slot.buf);
        self.queued_busy -= 1;
        let result = plan::status_result(status);
        if result.is_err() {
            log_failure(op, status);
        }
        self.ready.push_back(Completion { tag, result, data });
        Ok(None)
    }

    /// Runs requests produced by `next` (which fills a slot and returns `false` when there are
    /// no more), keeping up to [`MAX_IN_FLIGHT`] on the device, and waits for all of them.
    fn run(&mut self, mut next: impl FnMut(&mut Slot) -> bool) -> Result<(), BlockError> {
        let mut result = Ok(());
        let mut in_flight = 0usize;
        let mut more = true;
        loop {
            // Queue as many as fit, then notify the device once.
            let mut queued = 0;
            // A prepared request waits for queued requests to leave room on the ring.
            let mut blocked = false;
            while in_flight < MAX_IN_FLIGHT {
                let i = if let Some(i) = self.slot_states.next_prepared() {
                    i
                } else if !more {
                    break;
                } else if let Some(i) = self.slot_states.prepare() {
                    if !next(&mut self.slots[i]) {
                        self.slot_states.release(i);
                        more = false;
                        break;
                    }
                    i
                } else {
                    break;
                };
                match self.submit_slot(i) {
                    Ok(true) => {
                        in_flight += 1;
                        queued += 1;
                    }
                    Ok(false) if in_flight > 0 || self.queued_busy > 0 => {
                        blocked = true;
                        break;
                    }
                    Ok(false) | Err(_) => {
                        // Nothing is on the queue, yet this request does not fit: give up.
                        self.slot_states.release(i);
                        result = Err(BlockError::Io);
                        more = false;
                        break;
                    }
                }
            }
            if queued > 0 {
                self.notify_pending = true;
            }
            self.kick();
            if in_flight == 0 && !blocked {
                if self.waiter.is_some() {
                    // Every completion raised the interrupt line; lower it, or it would end
                    // the main loop's halts at once.
                    self.ack();
                }
                break;
            }
            let Some((i, status)) = self.complete_one()? else {
                // A queued request's completion, kept for `poll`.
                continue;
            };
            in_flight -= 1;
            if let Err(e) = plan::status_result(status)
                && result.is_ok()
            {
                log_failure(self.slots[i].op, status);
                result = Err(e);
                // Queue nothing more; wait for what the device holds.
                more = false;
                self.slot_states.drop_prepared();
            }
        }
        result
    }

    /// Moves `len` bytes at `ptr` to or from the device starting at virtio sector `sector`.
    fn transfer(
        &mut self,
        op: IoOp,
        sector: u64,
        ptr: *mut u8,
        len: usize,
    ) -> Result<(), BlockError> {
        let mut pieces = plan::transfer_pieces(sector, len, self.limits.request_max);
        self.run(|slot| {
            let Some(piece) = pieces.next() else {
                return false;
            };
            slot.op = op;
            slot.chunk = Chunk {
                sector: piece.sector,
                // SAFETY: `piece.offset < len`, so the pointer stays inside the caller's
                // buffer.
                ptr: unsafe { ptr.add(piece.offset) },
                len: piece.len,
            };
            slot.bytes = piece.len as u64;
            true
        })
    }

    /// Discards or zeroes `count` virtio sectors from `sector`, one range per request.
    fn ranges(&mut self, op: IoOp, sector: u64, count: u64, max: u64) -> Result<(), BlockError> {
        let kind = request_type(op);
        let mut pieces = plan::range_pieces(sector, count, max, self.limits.sectors_per_block());
        self.run(|slot| {
            let Some((first, n)) = pieces.next() else {
                return false;
            };
            slot.no_data(op, n * VIRTIO_SECTOR);
            slot.range = plan::range_segment(kind, first, n as u32);
            true
        })
    }
}

/// Logs why a request failed (its status byte).
fn log_failure(op: IoOp, status: u8) {
    if status == S_IOERR {
        warn!(
            "{} request failed: the host reported an I/O error (a full or failing host disk?)",
            op.name()
        );
    } else if plan::status_result(status) == Err(BlockError::Io) {
        warn!("{} request failed (status {status})", op.name());
    }
}

/// Cuts `chunk` into data segments of at most `seg_max` bytes.
///
/// # Safety
/// `chunk` must describe `len` writable bytes that nothing else accesses while the returned
/// slices are alive (or while the device holds them).
unsafe fn chunk_segments(
    chunk: Chunk,
    seg_max: usize,
    out: &mut heapless::Vec<&mut [u8], { MAX_SEGMENTS + 2 }>,
) -> usize {
    let mut covered = 0;
    for seg in plan::segments(chunk.len, seg_max) {
        // SAFETY: `seg.end <= len`; the caller guarantees exclusive access to the range.
        let slice = unsafe { core::slice::from_raw_parts_mut(chunk.ptr.add(seg.start), seg.len()) };
        if out.push(slice).is_err() {
            break;
        }
        covered = seg.end;
    }
    covered
}

/// Cuts `chunk` into read-only data segments of at most `seg_max` bytes, after what `out`
/// holds already.
///
/// # Safety
/// `chunk` must describe `len` readable bytes that nothing writes while the slices are alive.
unsafe fn chunk_segments_ro(
    chunk: Chunk,
    seg_max: usize,
    out: &mut heapless::Vec<&[u8], { MAX_SEGMENTS + 1 }>,
) {
    for seg in plan::segments(chunk.len, seg_max) {
        // SAFETY: `seg.end <= len`; the caller guarantees the range is not written meanwhile.
        let slice = unsafe {
            core::slice::from_raw_parts(chunk.ptr.add(seg.start).cast_const(), seg.len())
        };
        if out.push(slice).is_err() {
            break;
        }
    }
}

impl SectorDevice for VirtioBlk {
    fn sector_size(&self) -> u32 {
        self.limits.block_size
    }

    fn sector_count(&self) -> u64 {
        self.capacity / self.limits.sectors_per_block()
    }

    fn is_read_only(&self) -> bool {
        self.features & F_RO != 0
    }

    fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.limits.block_size as usize;
        if !buf.len().is_multiple_of(bs) {
            return Err(BlockError::Unsupported);
        }
        let first = self.check_blocks(sector, (buf.len() / bs) as u64)?;
        // The buffer is exclusively borrowed for the whole call; `transfer` waits for every
        // request before returning.
        self.transfer(IoOp::Read, first, buf.as_mut_ptr(), buf.len())
    }

    fn write_sectors(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
        if self.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.limits.block_size as usize;
        if !buf.len().is_multiple_of(bs) {
            return Err(BlockError::Unsupported);
        }
        let first = self.check_blocks(sector, (buf.len() / bs) as u64)?;
        // The device only reads the buffer of an OUT request (the descriptors are marked
        // device-readable); the pointer is made mutable only to share the chunk type.
        self.transfer(IoOp::Write, first, buf.as_ptr().cast_mut(), buf.len())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if !self.has_flush() {
            // Without VIRTIO_BLK_F_FLUSH the device writes through.
            return Ok(());
        }
        let mut sent = false;
        self.run(|slot| {
            if sent {
                return false;
            }
            sent = true;
            slot.no_data(IoOp::Flush, 0);
            true
        })
    }

    fn discard_sectors(&mut self, sector: u64, count: u64) -> Result<(), BlockError> {
        if self.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        if count == 0 || self.features & F_DISCARD == 0 {
            return Ok(());
        }
        let first = self.check_blocks(sector, count)?;
        let n = self.blocks_to_virtio(count);
        self.ranges(IoOp::Discard, first, n, self.limits.max_discard_sectors)
    }

    fn grow(&mut self, need: u64, want: u64, wait: bool) -> bool {
        self.grow_host_file(need, want, wait)
    }

    fn cut(&mut self, len: u64) -> bool {
        self.cut_host_file(len)
    }

    fn write_zeroes_sectors(&mut self, sector: u64, count: u64) -> Option<Result<(), BlockError>> {
        if self.features & F_WRITE_ZEROES == 0 {
            return None;
        }
        if self.is_read_only() {
            return Some(Err(BlockError::ReadOnly));
        }
        if count == 0 {
            return Some(Ok(()));
        }
        Some(self.check_blocks(sector, count).and_then(|first| {
            let n = self.blocks_to_virtio(count);
            self.ranges(
                IoOp::WriteZeroes,
                first,
                n,
                self.limits.max_write_zeroes_sectors,
            )
        }))
    }
}

impl VirtioBlk {
    /// Notifies the device of requests added since the last notification (if it wants to
    /// be told).
    fn kick(&mut self) {
        if core::mem::take(&mut self.notify_pending) && self.queue.should_notify() {
            self.transport.notify(QUEUE);
        }
    }

    /// Puts a queued request in a free slot and on the ring; gives it back when the ring
    /// has no room for it.
    fn submit_queued(&mut self, tag: u64, op: QueuedOp) -> Result<(), QueuedOp> {
        let bs = u64::from(self.limits.block_size);
        let (kind, offset, len) = match &op {
            QueuedOp::Read { offset, len } => (IoOp::Read, *offset, *len),
            QueuedOp::Write { offset, data } => (IoOp::Write, *offset, data.len()),
        };
        let checked = if kind == IoOp::Write && SectorDevice::is_read_only(self) {
            Err(BlockError::ReadOnly)
        } else if len == 0 || !offset.is_multiple_of(bs) || !(len as u64).is_multiple_of(bs) {
            Err(BlockError::Unsupported)
        } else {
            self.check_blocks(offset / bs, len as u64 / bs)
        };
        let sector = match checked {
            Ok(sector) => sector,
            Err(e) => {
                let data = match op {
                    QueuedOp::Write { data, .. } => data,
                    QueuedOp::Read { .. } => Vec::new(),
                };
                self.ready.push_back(Completion {
                    tag,
                    result: Err(e),
                    data,
                });
                return Ok(());
            }
        };
        if len > self.limits.request_max {
            // More than one device request (only on devices with small segment limits):
            // served at once on the synchronous side.
            let (result, data) = match op {
                QueuedOp::Read { len, .. } => {
                    let mut buf = alloc::vec![0; len];
                    let r = self.read_sectors(offset / bs, &mut buf);
                    (r, buf)
                }
                QueuedOp::Write { data, .. } => (self.write_sectors(offset / bs, &data), data),
            };
            self.ready.push_back(Completion { tag, result, data });
            return Ok(());
        }
        let Some(i) = self.slot_states.prepare() else {
            return Err(op);
        };
        let mut buf = match op {
            QueuedOp::Read { len, .. } => alloc::vec![0; len],
            QueuedOp::Write { data, .. } => data,
        };
        let slot = &mut self.slots[i];
        slot.op = kind;
        // The Vec's storage does not move when the Vec is moved into the slot.
        slot.chunk = Chunk {
            sector,
            ptr: buf.as_mut_ptr(),
            len,
        };
        slot.buf = buf;
        slot.bytes = len as u64;
        slot.owner = Owner::Queued(tag);
        let submitted = self.submit_slot(i);
        if let Ok(true) = submitted {
            self.queued_busy += 1;
            self.notify_pending = true;
            return Ok(());
        }
        self.slot_states.release(i);
        let slot = &mut self.slots[i];
        slot.owner = Owner::Call;
        let data = core::mem::take(&mut slot.buf);
        match submitted {
            Ok(_) => Err(match kind {
                IoOp::Write => QueuedOp::Write { offset, data },
                _ => QueuedOp::Read { offset, len },
            }),
            Err(e) => {
                self.ready.push_back(Completion {
                    tag,
                    result: Err(e),
                    data: if kind == IoOp::Write {
                        data
                    } else {
                        Vec::new()
                    },
                });
                Ok(())
            }
        }
    }
}

/// The asynchronous side, in bytes (the [`qcow_metal::block::Sectored`] wrapper passes it
/// on): whole logical blocks, at most [`QUEUE_DEPTH`] requests at once.
impl BlockQueue for VirtioBlk {
    fn queue_alignment(&self) -> u64 {
        u64::from(self.limits.block_size)
    }

    fn queue_depth(&self) -> usize {
        QUEUE_DEPTH
    }

    fn submit(&mut self, tag: u64, op: QueuedOp) -> Result<(), QueuedOp> {
        if self.in_flight() >= QUEUE_DEPTH {
            return Err(op);
        }
        self.submit_queued(tag, op)
    }

    fn poll(&mut self) -> Option<Completion> {
        self.kick();
        let mut completed = false;
        while self.queued_busy > 0
            && let Some(token) = self.queue.peek_used()
        {
            match self.complete_token(token) {
                Ok(None) => completed = true,
                Ok(Some(_)) => warn!("a request of no running call completed"),
                Err(_) => break,
            }
        }
        if completed && self.queued_busy == 0 && self.waiter.is_some() {
            // Every completion raised the interrupt line; lower it, or it would end the
            // main loop's halts at once.
            self.ack();
        }
        self.ready.pop_front()
    }

    fn in_flight(&self) -> usize {
        self.queued_busy + self.ready.len()
    }

    fn wait(&mut self) {
        self.kick();
        if self.ready.is_empty() && self.queued_busy > 0 {
            self.wait_used();
        }
    }
}
