//! The page tables after boot: the identity map built by `boot.rs`, its extension to RAM and
//! PCI BARs beyond it ([`map_identity`]), and a guard page below the boot stack
//! ([`unmap_page`]).
//!
//! The boot code maps `0..IDENTITY_MAP_LIMIT` with large pages (1 GiB or 2 MiB), writable,
//! write-back (the firmware's MTRRs make the PCI holes uncacheable on real hardware and KVM).
//! [`unmap_page`] splits the large page around one 4 KiB page, down to a page table, and
//! marks it not present: the stack then overflows into a page fault with CR2 in the guard
//! page (reported as a stack overflow), not into the page tables below it.

use core::arch::asm;
use core::cell::UnsafeCell;

use crate::cpu;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const HUGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

#[repr(C, align(4096))]
struct Table(UnsafeCell<[u64; 512]>);

// SAFETY: only touched on the boot CPU during `unmap_page`, before the main loop runs.
unsafe impl Sync for Table {}

/// Spare tables for splitting one 1 GiB page into 2 MiB pages and one 2 MiB page into 4 KiB
/// pages: enough for the one guard page.
static SPLIT_PD: Table = Table(UnsafeCell::new([0; 512]));
static SPLIT_PT: Table = Table(UnsafeCell::new([0; 512]));

/// Why the page tables could not be changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingError {
    /// The address is not mapped at all.
    NotMapped,
    /// The spare tables are used up (a second guard page would need more).
    NoSpareTable,
    /// No memory for a new page table.
    OutOfMemory,
    /// The range reaches past what the CPU can address (CPUID 0x80000008 physical bits).
    BeyondPhysicalAddressWidth,
}

/// The CPU's physical address width in bits.
pub fn physical_address_bits() -> u32 {
    if cpu::cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        cpu::cpuid(0x8000_0008, 0).eax & 0xff
    } else {
        36
    }
}

/// Makes sure `start..end` is identity-mapped (writable), adding 1 GiB pages when the CPU has
/// them and 2 MiB pages otherwise, with new tables from the heap. Ranges already mapped are
/// left alone. Used for RAM and PCI BARs above the boot map's
/// [`IDENTITY_MAP_LIMIT`](crate::boot::IDENTITY_MAP_LIMIT).
pub fn map_identity(start: u64, end: u64) -> Result<(), PagingError> {
    if end <= start {
        return Ok(());
    }
    if end > 1u64 << physical_address_bits() {
        return Err(PagingError::BeyondPhysicalAddressWidth);
    }
    let gib_pages = cpu::has_1g_pages();
    let unit: u64 = if gib_pages { 1 << 30 } else { 2 << 20 };
    let mut addr = start & !(unit - 1);
    let pml4 = (cpu::read_cr3() & ADDRESS_MASK) as *mut u64;
    while addr < end {
        let Some(pdpt) = next_table(pml4, index(addr, 4))? else {
            addr = addr.saturating_add(unit);
            continue;
        };
        if gib_pages {
            // SAFETY: `pdpt` is a live table; index < 512.
            let entry = unsafe { pdpt.add(index(addr, 3)) };
            // SAFETY: as above.
            if unsafe { entry.read_volatile() } & PRESENT == 0 {
                // SAFETY: a not-present entry becomes a 1 GiB identity page.
                unsafe { entry.write_volatile(addr | PRESENT | WRITABLE | HUGE) };
            }
        } else if let Some(pd) = next_table(pdpt, index(addr, 3))? {
            // SAFETY: `pd` is a live table; index < 512.
            let entry = unsafe { pd.add(index(addr, 2)) };
            // SAFETY: as above.
            if unsafe { entry.read_volatile() } & PRESENT == 0 {
                // SAFETY: a not-present entry becomes a 2 MiB identity page.
                unsafe { entry.write_volatile(addr | PRESENT | WRITABLE | HUGE) };
            }
        }
        addr = match addr.checked_add(unit) {
            Some(next) => next,
            None => break,
        };
    }
    flush_tlb();
    Ok(())
}

/// The table that entry `i` of `table` points to, creating it (zeroed) if not present, or
/// `None` if the entry is a large page (its whole range is mapped already).
fn next_table(table: *mut u64, i: usize) -> Result<Option<*mut u64>, PagingError> {
    // SAFETY: `table` is a live page table; `i` < 512.
    let entry = unsafe { table.add(i) };
    // SAFETY: as above.
    let value = unsafe { entry.read_volatile() };
    if value & PRESENT != 0 {
        if value & HUGE != 0 {
            return Ok(None);
        }
        return Ok(Some((value & ADDRESS_MASK) as *mut u64));
    }
    let page = crate::heap::alloc_dma(1).ok_or(PagingError::OutOfMemory)?;
    // SAFETY: a zeroed, page-aligned, identity-mapped page becomes the next-level table.
    unsafe { entry.write_volatile(page.as_ptr() as u64 | PRESENT | WRITABLE) };
    Ok(Some(page.as_ptr().cast()))
}

/// Drops every cached translation.
fn flush_tlb() {
    // SAFETY: reloading CR3 with its own value only flushes the TLB.
    unsafe {
        asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack, preserves_flags));
    }
}

/// Index of `addr` in the table at `level` (4 = PML4 .. 1 = page table).
fn index(addr: u64, level: u32) -> usize {
    ((addr >> (12 + 9 * (level - 1))) & 511) as usize
}

/// Makes the 4 KiB page at `addr` not present, splitting large pages as needed.
pub fn unmap_page(addr: u64) -> Result<(), PagingError> {
    let addr = addr & !0xfff;
    let mut table = (cpu::read_cr3() & ADDRESS_MASK) as *mut u64;
    let mut spares = [&SPLIT_PD, &SPLIT_PT].into_iter();
    for level in (2..=4).rev() {
        // SAFETY: `table` is a live page table (identity-mapped); `index` is < 512.
        let entry = unsafe { table.add(index(addr, level)) };
        // SAFETY: as above.
        let value = unsafe { entry.read_volatile() };
        if value & PRESENT == 0 {
            return Err(PagingError::NotMapped);
        }
        if level < 4 && value & HUGE != 0 {
            // Split: a table of 512 pages of the next size covering the same range.
            let spare = spares.next().ok_or(PagingError::NoSpareTable)?;
            let child_size = 1u64 << (12 + 9 * (level - 2));
            let base = value & ADDRESS_MASK & !((child_size << 9) - 1);
            let flags = value & 0xfff & !HUGE;
            let child_huge = if level == 3 { HUGE } else { 0 };
            // SAFETY: the spare table is unused (each is taken once from `spares`), static and
            // 4 KiB-aligned.
            let new = unsafe { &mut *spare.0.get() };
            for (i, slot) in new.iter_mut().enumerate() {
                *slot = (base + i as u64 * child_size) | flags | child_huge;
            }
            // SAFETY: replacing a large mapping by a table that maps the same range the same
            // way; the TLB is flushed below.
            unsafe { entry.write_volatile(new.as_ptr() as u64 | PRESENT | WRITABLE) };
        }
        // SAFETY: as above; the entry now points at a table.
        table = (unsafe { entry.read_volatile() } & ADDRESS_MASK) as *mut u64;
        if level == 2 {
            break;
        }
    }
    // `table` is now the page table holding `addr`.
    // SAFETY: a live page table; index < 512.
    unsafe {
        let pte = table.add(index(addr, 1));
        pte.write_volatile(pte.read_volatile() & !PRESENT);
    }
    // Also drops every cached translation of the split ranges.
    flush_tlb();
    Ok(())
}
