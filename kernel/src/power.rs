//! Power: the ACPI power button (polled) and powering off.
//!
//! # Power button
//! QMP `system_powerdown` (what the runner sends on Ctrl-C) presses the emulated ACPI power
//! button: QEMU sets `PWRBTN_STS` (bit 8 of PM1a_STS, at PM base + 0) only if the guest has set
//! `PWRBTN_EN` (bit 8 of PM1a_EN, at PM base + 2). The guest takes no interrupts, so the main
//! loop polls [`power_button_pressed`], which clears the status (write 1 to clear). The press
//! also raises the SCI ([`sci_irq`]), which `main.rs` arms as a wake-up of `apic::idle_until`.
//!
//! The PM I/O base comes from the south bridge's PCI configuration, as SeaBIOS programmed it
//! (0x600 on both machines):
//! - `q35`: ICH9 LPC bridge 00:1f.0 (8086:2918), register 0x40 (PMBASE) & 0xff80, decoding
//!   enabled by bit 7 (ACPI_EN) of register 0x44.
//! - `pc`: PIIX4 power management 00:01.3 (8086:7113), register 0x40 (PMBA) & 0xffc0,
//!   decoding enabled by bit 0 of register 0x80 (PMREGMISC).
//!
//! # Power-off
//! [`shutdown`] writes the exit code to QEMU's `isa-debug-exit` device (port 0xf4, when the
//! runner adds `-device isa-debug-exit,iobase=0xf4,iosize=0x04`), so QEMU exits with status
//! `(code << 1) | 1` (see [`GuestExit`]). Without that device it falls back to ACPI soft-off
//! (S5: SLP_TYP 0 with SLP_EN, bit 13 of PM1a_CNT at PM base + 4), which makes QEMU exit with
//! status 0; without ACPI it halts the CPU.

use core::sync::atomic::{AtomicU8, AtomicU16, Ordering};

use qcow_metal::config::GuestExit;

use crate::cpu::{self, inw, outb, outw};
use crate::pci::{PciAddress, PciDevice, VENDOR_INTEL};

/// I/O port of QEMU's `isa-debug-exit` device as the runner configures it.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

const PM1_STS: u16 = 0;
const PM1_EN: u16 = 2;
const PM1_CNT: u16 = 4;
const PWRBTN: u16 = 1 << 8;
const SLP_EN: u16 = 1 << 13;

/// Default PM base if the firmware left it unprogrammed.
const DEFAULT_PM_BASE: u16 = 0x600;

static PM_BASE: AtomicU16 = AtomicU16::new(0);
/// The ISA IRQ of the ACPI SCI (0 = unknown).
static SCI_IRQ: AtomicU8 = AtomicU8::new(0);

/// The south bridges the kernel knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chipset {
    /// ICH9 (QEMU `q35`).
    Ich9,
    /// PIIX4 (QEMU `pc`).
    Piix4,
}

/// Finds the ACPI PM block among `devices`, makes sure it decodes, and arms the power button.
/// Returns the chipset and PM base, or `None` (no ACPI: then only `isa-debug-exit` or QMP
/// `quit` stop the guest).
pub fn init(devices: &[PciDevice]) -> Option<(Chipset, u16)> {
    let (chipset, address) = devices
        .iter()
        .find_map(|d| match (d.vendor_id, d.device_id) {
            (VENDOR_INTEL, 0x2918) => Some((Chipset::Ich9, d.address)),
            (VENDOR_INTEL, 0x7113) => Some((Chipset::Piix4, d.address)),
            _ => None,
        })?;
    let base = match chipset {
        Chipset::Ich9 => enable_pm(address, 0xff80, 0x44, 0x80),
        Chipset::Piix4 => enable_pm(address, 0xffc0, 0x80, 0x01),
    };
    PM_BASE.store(base, Ordering::Relaxed);
    let sci = match chipset {
        // ACPI_CTRL bits 2:0 (SCI_IRQ_SEL): 9, 10, 11, -, 20, 21, 22, 23.
        Chipset::Ich9 => match address.read_u8(0x44) & 7 {
            0 => 9,
            1 => 10,
            2 => 11,
            sel @ 4..=7 => 16 + sel,
            _ => 0,
        },
        Chipset::Piix4 => 9,
    };
    SCI_IRQ.store(sci, Ordering::Relaxed);
    // Clear a stale press, then enable the button's status bit.
    outw(base + PM1_STS, PWRBTN);
    outw(base + PM1_EN, inw(base + PM1_EN) | PWRBTN);
    Some((chipset, base))
}

/// Reads the PM base at config register 0x40 (programming the default if it is unset) and
/// sets the decode-enable bit `enable_bit` of register `enable_reg`.
fn enable_pm(address: PciAddress, mask: u32, enable_reg: u8, enable_bit: u8) -> u16 {
    let mut base = (address.read_u32(0x40) & mask) as u16;
    if base == 0 {
        address.write_u32(0x40, u32::from(DEFAULT_PM_BASE) | 1);
        base = DEFAULT_PM_BASE;
    }
    let enable = address.read_u8(enable_reg);
    if enable & enable_bit == 0 {
        address.write_u8(enable_reg, enable | enable_bit);
    }
    base
}

/// The ACPI PM I/O base, if [`init`] found one.
pub fn pm_base() -> Option<u16> {
    match PM_BASE.load(Ordering::Relaxed) {
        0 => None,
        base => Some(base),
    }
}

/// The interrupt line (ISA IRQ / I/O APIC pin) of the ACPI SCI, which QEMU raises while the
/// power button's status is set: `apic::enable_wake_line` makes it end an idle period, so the
/// power button is seen at once.
pub fn sci_irq() -> Option<u8> {
    match SCI_IRQ.load(Ordering::Relaxed) {
        0 => None,
        irq => Some(irq),
    }
}

/// Whether the ACPI power button was pressed since the last call (clears the press).
pub fn power_button_pressed() -> bool {
    let Some(base) = pm_base() else {
        return false;
    };
    if inw(base + PM1_STS) & PWRBTN == 0 {
        return false;
    }
    outw(base + PM1_STS, PWRBTN);
    true
}

/// Powers the machine off with `exit` (see the module docs). Never returns.
pub fn shutdown(exit: GuestExit) -> ! {
    crate::println!(
        "qcow-metal: powering off: {} (QEMU exit status {})",
        exit,
        exit.qemu_status()
    );
    outb(DEBUG_EXIT_PORT, exit.code());
    // Still here: no isa-debug-exit device. ACPI S5 (QEMU's _S5 has SLP_TYP 0).
    if let Some(base) = pm_base() {
        outw(base + PM1_CNT, SLP_EN);
    }
    cpu::halt_forever()
}
