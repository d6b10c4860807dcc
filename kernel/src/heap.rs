//! The kernel heap: every byte of RAM the PVH memory map reports, except low memory (below
//! 1 MiB: BIOS data, the start info) and the kernel image, managed by `talc`.
//!
//! The heap is identity-mapped (see `boot.rs`), so any allocation's address is its physical
//! address: DMA buffers are ordinary allocations with page alignment ([`alloc_dma`]).
//!
//! Out of memory: a failed allocation that the caller does not handle ends in the `alloc`
//! crate's "memory allocation of N bytes failed" panic, which `panic.rs` turns into
//! [`GuestExit::OutOfMemory`](qcow_metal::config::GuestExit::OutOfMemory).

use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use talc::TalcLock;
use talc::source::Manual;

use crate::boot::{self, BootInfo, MEMMAP_RAM};
use crate::paging;

/// Page size of DMA allocations.
pub const PAGE_SIZE: usize = 4096;

/// Lowest address given to the heap.
const LOW_MEMORY_END: u64 = 1 << 20;

/// The global allocator: talc, because it is fast (binned free lists, O(1) free and in-place
/// realloc), `no_std`, actively maintained, and takes any number of disjoint regions, which is
/// what a PVH memory map gives. The lock is a spin lock: one CPU, and no allocation from
/// interrupt handlers.
#[global_allocator]
static ALLOCATOR: TalcLock<spin::mutex::SpinMutex<()>, Manual> = TalcLock::new(Manual);

static HEAP_BYTES: AtomicU64 = AtomicU64::new(0);
static RAM_BYTES: AtomicU64 = AtomicU64::new(0);

/// Hands the free RAM of `info`'s memory map to the allocator. Returns the bytes claimed.
///
/// RAM inside the boot identity map goes first; RAM above it (guests with more than 64 GiB) is
/// then mapped with page tables allocated from the first part, and claimed too.
pub fn init(info: &BootInfo) -> u64 {
    let (image_start, image_end) = boot::kernel_image();
    let mut ram = 0;
    let mut high = false;
    for entry in info.memmap().iter().filter(|e| e.kind == MEMMAP_RAM) {
        ram += entry.size;
        let start = entry.addr.max(LOW_MEMORY_END);
        let end = entry.addr.saturating_add(entry.size);
        high |= end > boot::IDENTITY_MAP_LIMIT;
        // The image splits a region into the parts below and above it.
        for (from, to) in [(start, end.min(image_start)), (start.max(image_end), end)] {
            claim(from, to.min(boot::IDENTITY_MAP_LIMIT));
        }
    }
    if high {
        for entry in info.memmap().iter().filter(|e| e.kind == MEMMAP_RAM) {
            let from = entry.addr.max(boot::IDENTITY_MAP_LIMIT);
            let to = entry.addr.saturating_add(entry.size);
            if to <= from {
                continue;
            }
            match paging::map_identity(from, to) {
                Ok(()) => claim(from, to),
                Err(e) => log::warn!("heap: RAM {from:#x}..{to:#x} left out: {e:?}"),
            }
        }
    }
    RAM_BYTES.store(ram, Ordering::Relaxed);
    heap_bytes()
}

/// Gives `from..to` to the allocator (regions under 64 KiB are not worth the bookkeeping).
fn claim(from: u64, to: u64) {
    if to <= from || to - from < 64 << 10 {
        return;
    }
    // SAFETY: callers pass RAM from the memory map that is identity-mapped, outside the kernel
    // image and low memory, and used by nothing else.
    let claimed = unsafe {
        ALLOCATOR
            .lock()
            .claim(from as *mut u8, (to - from) as usize)
    };
    match claimed {
        Some(_) => {
            HEAP_BYTES.fetch_add(to - from, Ordering::Relaxed);
        }
        None => log::warn!("heap: could not claim {from:#x}..{to:#x}"),
    }
}

/// Bytes handed to the allocator at boot.
pub fn heap_bytes() -> u64 {
    HEAP_BYTES.load(Ordering::Relaxed)
}

/// Bytes of RAM in the memory map.
pub fn ram_bytes() -> u64 {
    RAM_BYTES.load(Ordering::Relaxed)
}

/// A snapshot of the allocator's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes handed to the allocator.
    pub claimed_bytes: u64,
    /// Bytes in live allocations (as requested).
    pub allocated_bytes: u64,
    /// Bytes still available for allocation.
    pub available_bytes: u64,
    /// Live allocations.
    pub allocations: u64,
    /// Allocations since boot.
    pub total_allocations: u64,
}

/// The allocator's current figures (takes the allocator lock briefly; not for the panic path).
pub fn stats() -> HeapStats {
    let talc = ALLOCATOR.lock();
    let c = talc.counters();
    HeapStats {
        claimed_bytes: c.claimed_bytes as u64,
        allocated_bytes: c.allocated_bytes as u64,
        available_bytes: c.available_bytes as u64,
        allocations: c.allocation_count as u64,
        total_allocations: c.total_allocation_count,
    }
}

/// Prints the heap size (used on the out-of-memory path; takes no lock).
pub fn report() {
    crate::println!(
        "  heap: {} KiB in all, {} KiB of RAM",
        heap_bytes() >> 10,
        ram_bytes() >> 10
    );
}

/// The layout of `pages` zeroed, page-aligned pages, or `None` if the size overflows.
pub fn dma_layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
}

/// Allocates `pages` zeroed, page-aligned pages for DMA. The address is physical too (identity
/// map). `None` if `pages` is 0 or memory is short. Free with [`free_dma`].
pub fn alloc_dma(pages: usize) -> Option<NonNull<u8>> {
    let layout = dma_layout(pages).filter(|l| l.size() > 0)?;
    // SAFETY: the layout has a non-zero size.
    NonNull::new(unsafe { alloc_zeroed(layout) })
}

/// Frees pages from [`alloc_dma`].
///
/// # Safety
/// `ptr` must come from `alloc_dma(pages)` with the same `pages`, and not be used afterwards.
pub unsafe fn free_dma(ptr: NonNull<u8>, pages: usize) {
    if let Some(layout) = dma_layout(pages) {
        // SAFETY: the caller guarantees `ptr` was allocated with this layout.
        unsafe { dealloc(ptr.as_ptr(), layout) }
    }
}

/// The physical address of a kernel pointer (identity map: the same number).
pub fn virt_to_phys<T>(ptr: *const T) -> u64 {
    ptr as u64
}

/// A pointer to physical address `paddr` (identity map), e.g. for an MMIO BAR.
pub fn phys_to_virt<T>(paddr: u64) -> *mut T {
    paddr as *mut T
}
