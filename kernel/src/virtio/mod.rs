//! virtio glue: the DMA/MMIO hooks `virtio-drivers` needs ([`KernelHal`]), PCI configuration
//! space through port I/O ([`pci`]), and the two drivers the guest uses: virtio-blk as a
//! [`qcow_metal::block::SectorDevice`] ([`blk`]) and virtio-net as a smoltcp device ([`net`]).
//!
//! Memory model: all RAM and the PCI MMIO windows are identity-mapped by the boot code, so a
//! buffer's virtual address is its physical address, and there is no IOMMU. DMA memory is
//! therefore just page-aligned heap memory, and sharing a buffer with a device is free.

pub mod blk;
pub mod net;
pub mod pci;

use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

/// The [`Hal`] of this kernel: identity mapping, heap-backed DMA memory, no IOMMU.
pub struct KernelHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    let size = pages.checked_mul(PAGE_SIZE)?;
    if size == 0 {
        return None;
    }
    Layout::from_size_align(size, PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` hands out page-aligned, zeroed, exclusively owned heap memory whose
// physical address equals its virtual address (the boot code identity-maps all RAM);
// `mmio_phys_to_virt` returns the identity-mapped address of a BAR region, which the boot
// code maps; `share` returns the buffer's own address, valid for DMA for the same reason.
unsafe impl Hal for KernelHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = dma_layout(pages) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: `layout` has a non-zero size (checked by `dma_layout`).
        let ptr = unsafe { alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => (p.as_ptr() as PhysAddr, p),
            // virtio-drivers treats a zero physical address as an allocation failure.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(layout) = dma_layout(pages) else {
            return -1;
        };
        // SAFETY: the caller passes back exactly what `dma_alloc` returned for `pages` pages,
        // which came from `alloc_zeroed` with this same layout and has not been freed yet.
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Identity mapping: the BAR's physical address is where the CPU reaches it.
        NonNull::new(paddr as usize as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        // No IOMMU and no bounce buffers: the device reads and writes the buffer in place.
        buffer.as_ptr() as *mut u8 as usize as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // Nothing was mapped or copied by `share`.
    }
}
