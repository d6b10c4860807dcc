//! The IDT: every one of the 256 vectors has a handler on an IST stack.
//!
//! The guest runs with interrupts masked (it polls); only while the main loop idles
//! (`apic::idle_until`) can the local APIC timer and armed devices interrupt, and their
//! handlers just acknowledge. Any other vector is fatal: the handler prints the vector, its
//! name, RIP, the error code, CR2 and the registers on the console, and powers off with
//! [`GuestExit::Fault`] (QEMU exit status 37).
//!
//! The stubs are 16 bytes apart from `isr_stubs`: each pushes a dummy error code when the CPU
//! does not push one, then the vector number, and jumps to `isr_common`, which saves the
//! general registers and calls [`interrupt_dispatch`] with a pointer to the [`Frame`].
//!
//! Debugging: `qemu-system-x86_64 ... -d int,cpu_reset -D /tmp/int.log` logs every exception
//! QEMU delivers (with the registers), which also shows faults that happen before the IDT is
//! loaded (triple faults then show as a CPU reset; use `-no-reboot`).

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::fmt::Write as _;
use core::mem::size_of;

use qcow_metal::config::GuestExit;

use crate::gdt::{IST_DOUBLE_FAULT, IST_INTERRUPT, KERNEL_CODE};
use crate::serial::Serial;
use crate::{cpu, power};

// The stubs. The CPU pushes an error code for vectors 8, 10-14, 17, 21, 29 and 30; the other
// stubs push a 0 in its place so every frame has the same shape.
global_asm!(
    r#"
    .pushsection .text.isr, "ax"
    .balign 16
    .global isr_stubs
isr_stubs:
    .set vector, 0
    .rept 256
    .balign 16
    .if (vector == 8) || ((vector >= 10) && (vector <= 14)) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    pushq $0
    .endif
    pushq $vector
    jmp isr_common
    .set vector, vector + 1
    .endr

isr_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rbx
    pushq %rbp
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call interrupt_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rbp
    popq %rbx
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq
    .popsection
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    static isr_stubs: u8;
}

/// Distance between two stubs.
const STUB_SIZE: u64 = 16;

/// What `isr_common` saved, lowest address first, then what the CPU pushed.
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    /// Saved general registers.
    pub r15: u64,
    #[allow(missing_docs)]
    pub r14: u64,
    #[allow(missing_docs)]
    pub r13: u64,
    #[allow(missing_docs)]
    pub r12: u64,
    #[allow(missing_docs)]
    pub r11: u64,
    #[allow(missing_docs)]
    pub r10: u64,
    #[allow(missing_docs)]
    pub r9: u64,
    #[allow(missing_docs)]
    pub r8: u64,
    #[allow(missing_docs)]
    pub rdi: u64,
    #[allow(missing_docs)]
    pub rsi: u64,
    #[allow(missing_docs)]
    pub rbp: u64,
    #[allow(missing_docs)]
    pub rbx: u64,
    #[allow(missing_docs)]
    pub rdx: u64,
    #[allow(missing_docs)]
    pub rcx: u64,
    #[allow(missing_docs)]
    pub rax: u64,
    /// The vector number (pushed by the stub).
    pub vector: u64,
    /// The CPU's error code, or 0.
    pub error_code: u64,
    /// Where the CPU was.
    pub rip: u64,
    /// Code segment.
    pub cs: u64,
    /// Flags.
    pub rflags: u64,
    /// Stack pointer at the time of the interrupt.
    pub rsp: u64,
    /// Stack segment.
    pub ss: u64,
}

/// The name of an exception vector.
pub fn vector_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        2 => "non-maskable interrupt (NMI)",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range exceeded (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        9 => "coprocessor segment overrun",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack-segment fault (#SS)",
        13 => "general protection fault (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating-point exception (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating-point exception (#XM)",
        20 => "virtualization exception (#VE)",
        21 => "control protection exception (#CP)",
        28 => "hypervisor injection exception (#HV)",
        29 => "VMM communication exception (#VC)",
        30 => "security exception (#SX)",
        15 | 22..=31 => "reserved exception",
        _ => "unexpected interrupt",
    }
}

/// Called by `isr_common` with the saved state. The idle-loop interrupts (see `apic.rs`)
/// return; everything else is fatal.
#[unsafe(no_mangle)]
extern "C" fn interrupt_dispatch(frame: &Frame) {
    if crate::apic::handle_interrupt(frame.vector) {
        return;
    }
    report(frame);
    power::shutdown(GuestExit::Fault);
}

fn report(frame: &Frame) {
    let mut out = Serial;
    let _ = writeln!(
        out,
        "\nFATAL: CPU exception {} {} at RIP {:#018x}, error code {:#x}, CR2 {:#018x}",
        frame.vector,
        vector_name(frame.vector),
        frame.rip,
        frame.error_code,
        cpu::read_cr2(),
    );
    if frame.vector == 14 {
        let guard = crate::boot::stack_guard();
        if (guard..guard + 4096).contains(&cpu::read_cr2()) {
            let _ = writeln!(
                out,
                "  kernel stack overflow: the {} KiB boot stack is exhausted",
                crate::boot::BOOT_STACK_SIZE >> 10
            );
        }
        let e = frame.error_code;
        let _ = writeln!(
            out,
            "  page fault: {} on a {} page{}{}",
            if e & 2 != 0 {
                "write"
            } else if e & 16 != 0 {
                "instruction fetch"
            } else {
                "read"
            },
            if e & 1 != 0 { "present" } else { "non-present" },
            if e & 8 != 0 { ", reserved bit set" } else { "" },
            if e & 4 != 0 { ", user mode" } else { "" },
        );
    }
    let _ = writeln!(
        out,
        "  RAX {:016x} RBX {:016x} RCX {:016x} RDX {:016x}\n  RSI {:016x} RDI {:016x} RBP {:016x} RSP {:016x}\n  R8  {:016x} R9  {:016x} R10 {:016x} R11 {:016x}\n  R12 {:016x} R13 {:016x} R14 {:016x} R15 {:016x}\n  CS {:#x} SS {:#x} RFLAGS {:#x} CR3 {:#x}",
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp,
        frame.rsp,
        frame.r8,
        frame.r9,
        frame.r10,
        frame.r11,
        frame.r12,
        frame.r13,
        frame.r14,
        frame.r15,
        frame.cs,
        frame.ss,
        frame.rflags,
        cpu::read_cr3(),
    );
    let _ = writeln!(
        out,
        "  (addr2line -e target/kernel/release/qcow-metal-kernel {:#x} names the code)",
        frame.rip
    );
}

/// One 16-byte interrupt gate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const EMPTY_GATE: Gate = Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
};

struct Idt(UnsafeCell<[Gate; 256]>);

// SAFETY: written once in `init` on the boot CPU before it is loaded.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([EMPTY_GATE; 256]));

#[repr(C, packed(2))]
struct Pointer {
    limit: u16,
    base: u64,
}

/// Fills and loads the IDT. Call after `gdt::init` (the gates use its selectors and ISTs).
pub fn init() {
    let stubs = &raw const isr_stubs as u64;
    // SAFETY: single-threaded boot; the IDT is not loaded yet.
    let idt = unsafe { &mut *IDT.0.get() };
    for (vector, gate) in idt.iter_mut().enumerate() {
        let handler = stubs + vector as u64 * STUB_SIZE;
        *gate = Gate {
            offset_low: handler as u16,
            selector: KERNEL_CODE,
            ist: if vector == 8 {
                IST_DOUBLE_FAULT
            } else {
                IST_INTERRUPT
            },
            type_attr: 0x8E, // present, DPL 0, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        };
    }
    let pointer = Pointer {
        limit: (size_of::<[Gate; 256]>() - 1) as u16,
        base: idt.as_ptr() as u64,
    };
    // SAFETY: the IDT is static and every gate points at a stub.
    unsafe {
        asm!("lidt [{}]", in(reg) &raw const pointer, options(readonly, nostack, preserves_flags))
    };
}

/// Raises a CPU exception on purpose (the `debug_fault=` test hook).
pub fn raise(fault: qcow_metal::config::DebugFault) {
    use qcow_metal::config::DebugFault;
    match fault {
        DebugFault::None => {}
        // SAFETY: deliberately faults; the handler reports it and powers off.
        DebugFault::Ud => unsafe { asm!("ud2", options(nomem, nostack)) },
        DebugFault::Pf => {
            // Above the identity map: not present.
            let address = crate::boot::IDENTITY_MAP_LIMIT + 0x1234_5000;
            // SAFETY: deliberately faults (page not present).
            let _ = unsafe { core::ptr::read_volatile(address as *const u64) };
        }
        DebugFault::Gp => {
            // Non-canonical address.
            // SAFETY: deliberately faults (#GP).
            let _ = unsafe { core::ptr::read_volatile(0x8000_0000_0000_0000u64 as *const u64) };
        }
    }
}
