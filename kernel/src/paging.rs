//! The page tables after boot: the identity map built by `boot.rs`, and the one change the
//! kernel makes to it, a guard page below the boot stack.
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

/// Why [`unmap_page`] could not unmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingError {
    /// The address is not mapped at all.
    NotMapped,
    /// The spare tables are used up (a second guard page would need more).
    NoSpareTable,
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
        // Reload CR3: drops every cached translation of the split ranges, too.
        asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack, preserves_flags));
    }
    Ok(())
}
