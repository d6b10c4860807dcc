//! The 64-bit GDT and the TSS that holds the interrupt stacks.
//!
//! Selectors: `0x08` kernel code, `0x10` kernel data, `0x18` TSS. The boot code's GDT has the
//! same code/data selectors, so switching tables needs only a reload.
//!
//! Every IDT entry switches to an IST stack (see `interrupts.rs`): the host target's code uses
//! the 128-byte red zone below `rsp`, which an interrupt pushed onto the current stack would
//! overwrite. IST1 serves all vectors except the double fault, which gets IST2 so that a fault
//! while handling a fault still reaches a handler on a fresh stack.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::mem::size_of;

/// Kernel code selector.
pub const KERNEL_CODE: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DATA: u16 = 0x10;
/// TSS selector.
pub const TSS_SELECTOR: u16 = 0x18;

/// IST index (1-based, as in the IDT) of the stack for all vectors but the double fault.
pub const IST_INTERRUPT: u8 = 1;
/// IST index of the double-fault stack.
pub const IST_DOUBLE_FAULT: u8 = 2;

/// Size of each IST stack.
pub const IST_STACK_SIZE: usize = 64 << 10;

#[repr(C, align(16))]
struct Stack(UnsafeCell<[u8; IST_STACK_SIZE]>);

// SAFETY: the stacks are only ever used by the CPU through the TSS.
unsafe impl Sync for Stack {}

static INTERRUPT_STACK: Stack = Stack(UnsafeCell::new([0; IST_STACK_SIZE]));
static DOUBLE_FAULT_STACK: Stack = Stack(UnsafeCell::new([0; IST_STACK_SIZE]));

/// The 64-bit task-state segment (only the stack pointers are used).
#[repr(C, packed(4))]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

struct Tables {
    gdt: [u64; 5],
    tss: Tss,
}

struct Global(UnsafeCell<Tables>);

// SAFETY: written once in `init` on the boot CPU before anything else can look at it.
unsafe impl Sync for Global {}

static TABLES: Global = Global(UnsafeCell::new(Tables {
    gdt: [0; 5],
    tss: Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap_base: size_of::<Tss>() as u16,
    },
}));

#[repr(C, packed(2))]
struct Pointer {
    limit: u16,
    base: u64,
}

/// Top of an IST stack, 16-byte aligned.
fn top(stack: &Stack) -> u64 {
    stack.0.get() as u64 + IST_STACK_SIZE as u64
}

/// Builds the GDT and TSS, loads them and reloads the segment registers. Call once, first
/// thing in `kernel_main`.
pub fn init() {
    // SAFETY: single-threaded boot, nothing else references TABLES yet.
    let tables = unsafe { &mut *TABLES.0.get() };
    tables.tss.ist[usize::from(IST_INTERRUPT) - 1] = top(&INTERRUPT_STACK);
    tables.tss.ist[usize::from(IST_DOUBLE_FAULT) - 1] = top(&DOUBLE_FAULT_STACK);

    let tss_base = &raw const tables.tss as u64;
    let tss_limit = (size_of::<Tss>() - 1) as u64;
    tables.gdt[0] = 0;
    tables.gdt[1] = 0x00af_9a00_0000_ffff; // 64-bit code, DPL 0
    tables.gdt[2] = 0x00cf_9200_0000_ffff; // data, DPL 0
    // 64-bit available TSS (type 9), present.
    tables.gdt[3] = (tss_limit & 0xffff)
        | ((tss_base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((tss_limit >> 16) & 0xf) << 48)
        | (((tss_base >> 24) & 0xff) << 56);
    tables.gdt[4] = tss_base >> 32;

    let pointer = Pointer {
        limit: (size_of::<[u64; 5]>() - 1) as u16,
        base: tables.gdt.as_ptr() as u64,
    };
    // SAFETY: the GDT is static and valid; the code/data selectors match the boot GDT's, the far
    // return reloads CS, and the TSS descriptor is available (not busy) when `ltr` loads it.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "push {code}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "mov ss, {data:x}",
            "ltr {tss:x}",
            ptr = in(reg) &raw const pointer,
            code = in(reg) u64::from(KERNEL_CODE),
            data = in(reg) u64::from(KERNEL_DATA),
            tss = in(reg) u64::from(TSS_SELECTOR),
            tmp = out(reg) _,
        );
    }
}
