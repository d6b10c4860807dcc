//! Interrupts for idling: the local APIC timer, and optional wake-ups from PCI devices through
//! the I/O APIC. Nothing else in the kernel takes interrupts.
//!
//! The guest polls. To cost the host nothing when idle, the main loop calls [`idle_until`]:
//! it arms the local APIC timer in one-shot mode for the deadline, executes `sti; hlt; cli`
//! and returns when the timer (or a device armed with [`enable_wake`]) interrupts. Interrupts
//! are enabled only inside that window, so no Rust code is ever interrupted, and the handlers
//! (on the IST stack, see `gdt.rs`) only acknowledge.
//!
//! Device wake-ups: [`enable_wake`] routes a PCI function's INTx line (the ISA IRQ number the
//! firmware wrote to its interrupt-line register) through the I/O APIC as a level-triggered,
//! active-high interrupt (as QEMU's ACPI tables describe PCI links). The handler masks the
//! line (a level-triggered line stays asserted until the driver acknowledges the device, e.g.
//! virtio's ISR read, `ack_interrupt()` in virtio-drivers); the next [`idle_until`] unmasks it.
//! So a driver that never acknowledges only turns idling back into polling.
//!
//! The legacy 8259 PICs are remapped to vectors 0x30..0x3f and masked: SeaBIOS leaves the PIT's
//! IRQ 0 on vector 8, which would look like a double fault.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::cpu::{self, outb};
use crate::pci::PciDevice;
use crate::time;

/// Vector of the local APIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of device wake-ups (all lines share it).
pub const DEVICE_VECTOR: u8 = 0x21;
/// First vector of the (masked) 8259 PICs.
pub const PIC_VECTOR_BASE: u8 = 0x30;
/// Spurious-interrupt vector of the local APIC.
pub const SPURIOUS_VECTOR: u8 = 0xff;

const IA32_APIC_BASE: u32 = 0x1b;
const REG_EOI: u64 = 0xb0;
const REG_SPURIOUS: u64 = 0xf0;
const REG_LVT_TIMER: u64 = 0x320;
const REG_TIMER_INITIAL: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;

/// The I/O APIC's address on QEMU's machines (the MADT says the same).
const IOAPIC_BASE: u64 = 0xfec0_0000;
const IOAPIC_PIN_MASKED: u32 = 1 << 16;
const IOAPIC_LEVEL: u32 = 1 << 15;

static APIC_BASE: AtomicU64 = AtomicU64::new(0);
/// Local APIC timer ticks per millisecond (divide-by-16 clock).
static TIMER_PER_MS: AtomicU64 = AtomicU64::new(0);
/// Bitmap of I/O APIC pins armed by `enable_wake`.
static WAKE_PINS: AtomicU32 = AtomicU32::new(0);
static DEVICE_PENDING: AtomicBool = AtomicBool::new(false);

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an architectural MSR that exists on every x86-64 CPU with an APIC.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn lapic_write(reg: u64, value: u32) {
    let base = APIC_BASE.load(Ordering::Relaxed);
    // SAFETY: the local APIC's registers are identity-mapped MMIO at `base`; `reg` is one of
    // the architectural register offsets.
    unsafe { ((base + reg) as *mut u32).write_volatile(value) }
}

fn lapic_read(reg: u64) -> u32 {
    let base = APIC_BASE.load(Ordering::Relaxed);
    // SAFETY: as for `lapic_write`.
    unsafe { ((base + reg) as *const u32).read_volatile() }
}

fn ioapic_write(reg: u32, value: u32) {
    // SAFETY: the I/O APIC's index/data registers, identity-mapped MMIO.
    unsafe {
        (IOAPIC_BASE as *mut u32).write_volatile(reg);
        ((IOAPIC_BASE + 0x10) as *mut u32).write_volatile(value);
    }
}

fn ioapic_read(reg: u32) -> u32 {
    // SAFETY: as for `ioapic_write`.
    unsafe {
        (IOAPIC_BASE as *mut u32).write_volatile(reg);
        ((IOAPIC_BASE + 0x10) as *const u32).read_volatile()
    }
}

/// Remaps and masks the 8259s, enables the local APIC and measures its timer against the TSC
/// (1 ms). Returns the timer's ticks per millisecond, or `None` if the CPU has no APIC (then
/// [`idle_until`] busy-waits).
pub fn init() -> Option<u64> {
    // 8259: ICW1 (init, ICW4 follows), ICW2 (vector base), ICW3 (cascade), ICW4 (8086 mode),
    // then mask every line.
    for (port, base, cascade) in [
        (0x20u16, PIC_VECTOR_BASE, 4u8),
        (0xa0, PIC_VECTOR_BASE + 8, 2),
    ] {
        outb(port, 0x11);
        outb(port + 1, base);
        outb(port + 1, cascade);
        outb(port + 1, 0x01);
        outb(port + 1, 0xff);
    }
    if cpu::cpuid(1, 0).edx & (1 << 9) == 0 {
        return None;
    }
    APIC_BASE.store(
        rdmsr(IA32_APIC_BASE) & 0x000f_ffff_ffff_f000,
        Ordering::Relaxed,
    );
    lapic_write(REG_SPURIOUS, 0x100 | u32::from(SPURIOUS_VECTOR));
    lapic_write(REG_TIMER_DIVIDE, 0x3); // divide by 16
    lapic_write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    // Count for about 1 ms, then read both clocks back to back: a pause of the virtual CPU in
    // the middle lengthens both counts alike.
    lapic_write(REG_TIMER_INITIAL, u32::MAX);
    let tsc_start = cpu::rdtsc();
    time::delay_us(1000);
    let remaining = lapic_read(REG_TIMER_CURRENT);
    let tsc_ticks = cpu::rdtsc().wrapping_sub(tsc_start).max(1);
    lapic_write(REG_TIMER_INITIAL, 0);
    let elapsed_ns = time::ticks_to_ns(tsc_ticks).max(1);
    let per_ms = (u64::from(u32::MAX - remaining) * 1_000_000 / elapsed_ns).max(1);
    TIMER_PER_MS.store(per_ms, Ordering::Relaxed);
    Some(per_ms)
}

/// Routes `device`'s INTx line to [`DEVICE_VECTOR`] so that it ends [`idle_until`] early.
/// Returns the I/O APIC pin, or `None` when the device has no legacy interrupt (or there is
/// no APIC).
pub fn enable_wake(device: &PciDevice) -> Option<u8> {
    if device.interrupt_pin == 0 {
        return None;
    }
    enable_wake_line(device.interrupt_line)
}

/// Routes ISA interrupt `line` (an I/O APIC pin below 24, level-triggered active-high as QEMU
/// wires PCI links and the ACPI SCI) to [`DEVICE_VECTOR`], so that it ends [`idle_until`]
/// early. `power.rs` arms the SCI (IRQ 9) this way, so the power button wakes an idle guest.
pub fn enable_wake_line(line: u8) -> Option<u8> {
    let pin = line;
    if APIC_BASE.load(Ordering::Relaxed) == 0 || pin == 0 || pin >= 24 {
        return None;
    }
    // Entry: vector, fixed delivery, physical destination APIC 0, active high, level, masked
    // until the next `idle_until`.
    let reg = 0x10 + 2 * u32::from(pin);
    ioapic_write(reg + 1, 0);
    ioapic_write(
        reg,
        u32::from(DEVICE_VECTOR) | IOAPIC_LEVEL | IOAPIC_PIN_MASKED,
    );
    WAKE_PINS.fetch_or(1 << pin, Ordering::Relaxed);
    Some(pin)
}

/// Whether a device interrupt arrived since the last call (clears it).
pub fn take_device_wake() -> bool {
    DEVICE_PENDING.swap(false, Ordering::Relaxed)
}

fn set_wake_pins_masked(masked: bool) {
    let mut pins = WAKE_PINS.load(Ordering::Relaxed);
    while pins != 0 {
        let pin = pins.trailing_zeros();
        pins &= pins - 1;
        let reg = 0x10 + 2 * pin;
        let low = ioapic_read(reg);
        let low = if masked {
            low | IOAPIC_PIN_MASKED
        } else {
            low & !IOAPIC_PIN_MASKED
        };
        ioapic_write(reg, low);
    }
}

/// Halts the CPU until `deadline_ns` (on the [`time::now_ns`] clock) or until an armed device
/// interrupts, whichever is first. Returns at once if the deadline has passed.
pub fn idle_until(deadline_ns: u64) {
    let now = time::now_ns();
    if deadline_ns <= now {
        return;
    }
    let per_ms = TIMER_PER_MS.load(Ordering::Relaxed);
    if per_ms == 0 {
        while time::now_ns() < deadline_ns {
            cpu::spin_hint();
        }
        return;
    }
    let ticks = (u128::from(deadline_ns - now) * u128::from(per_ms) / 1_000_000)
        .clamp(1, u128::from(u32::MAX));
    lapic_write(REG_LVT_TIMER, u32::from(TIMER_VECTOR));
    lapic_write(REG_TIMER_INITIAL, ticks as u32);
    set_wake_pins_masked(false);
    // SAFETY: interrupts are enabled only for the `hlt`: `sti` takes effect after the next
    // instruction, so an interrupt already pending ends the `hlt` rather than slipping in before
    // it. Every vector has a handler on an IST stack (no red-zone damage), and the handlers for
    // the timer and device vectors return; `clobber_abi` tells the compiler that the handler
    // may have changed every caller-saved register, SSE ones included.
    unsafe {
        asm!(
            "sti",
            "hlt",
            "cli",
            clobber_abi("C"),
            options(nomem, nostack)
        )
    };
    set_wake_pins_masked(true);
    lapic_write(REG_TIMER_INITIAL, 0);
    lapic_write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
}

/// Handles the vectors above; returns `false` for any other vector (which is fatal).
pub fn handle_interrupt(vector: u64) -> bool {
    match vector {
        v if v == u64::from(TIMER_VECTOR) => {
            lapic_write(REG_EOI, 0);
            true
        }
        v if v == u64::from(DEVICE_VECTOR) => {
            // The line stays asserted until the driver acknowledges the device: mask it.
            set_wake_pins_masked(true);
            DEVICE_PENDING.store(true, Ordering::Relaxed);
            lapic_write(REG_EOI, 0);
            true
        }
        // Spurious: no EOI.
        v if v == u64::from(SPURIOUS_VECTOR) => true,
        // A stray 8259 interrupt despite the mask: acknowledge it at the PICs.
        v if (u64::from(PIC_VECTOR_BASE)..u64::from(PIC_VECTOR_BASE) + 16).contains(&v) => {
            if v >= u64::from(PIC_VECTOR_BASE) + 8 {
                outb(0xa0, 0x20);
            }
            outb(0x20, 0x20);
            true
        }
        _ => false,
    }
}
