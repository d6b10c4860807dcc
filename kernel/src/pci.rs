//! PCI: configuration space through the legacy I/O ports (`0xCF8` address, `0xCFC` data),
//! which both QEMU machines (`q35` and `pc`) provide, and bus enumeration.
//!
//! Enumeration starts at bus 0 and follows PCI-to-PCI bridges to their secondary buses (q35's
//! PCIe root ports are such bridges), probing all eight functions of multi-function devices.
//! SeaBIOS has already assigned the BARs and enabled decoding; the kernel only reads them and
//! measures their sizes. Everything is identity-mapped (see `boot.rs`), so a memory BAR's
//! address can be used as a pointer directly.

use alloc::vec::Vec;
use core::fmt;
use virtio_drivers::transport::pci::bus::{
    ConfigurationAccess, DeviceFunction, HeaderType, PciRoot,
};

use crate::cpu::{inl, outb, outl, outw};

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// Red Hat / virtio vendor id.
pub const VENDOR_VIRTIO: u16 = 0x1af4;
/// Intel vendor id.
pub const VENDOR_INTEL: u16 = 0x8086;

/// Configuration-space register offsets of the common header.
pub mod reg {
    /// Vendor id (16 bits).
    pub const VENDOR_ID: u8 = 0x00;
    /// Device id (16 bits).
    pub const DEVICE_ID: u8 = 0x02;
    /// Command (16 bits).
    pub const COMMAND: u8 = 0x04;
    /// Status (16 bits).
    pub const STATUS: u8 = 0x06;
    /// Revision, prog-if, subclass, class (32 bits).
    pub const CLASS_REVISION: u8 = 0x08;
    /// Header type (8 bits; bit 7 = multi-function).
    pub const HEADER_TYPE: u8 = 0x0E;
    /// First BAR (32 bits each).
    pub const BAR0: u8 = 0x10;
    /// Type-1 header: secondary bus number (8 bits).
    pub const SECONDARY_BUS: u8 = 0x19;
    /// Subsystem vendor id (16 bits, type-0 header).
    pub const SUBSYSTEM_VENDOR_ID: u8 = 0x2C;
    /// Subsystem id (16 bits, type-0 header).
    pub const SUBSYSTEM_ID: u8 = 0x2E;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES: u8 = 0x34;
    /// Interrupt line (8 bits).
    pub const INTERRUPT_LINE: u8 = 0x3C;
    /// Interrupt pin (8 bits).
    pub const INTERRUPT_PIN: u8 = 0x3D;
}

/// Command register bits.
pub mod command {
    /// Respond to I/O space accesses.
    pub const IO_SPACE: u16 = 1 << 0;
    /// Respond to memory space accesses.
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// May act as a bus master (needed for DMA).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// INTx# assertion disabled.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// A function's place on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// Bus 0..=255.
    pub bus: u8,
    /// Device 0..=31.
    pub device: u8,
    /// Function 0..=7.
    pub function: u8,
}

impl PciAddress {
    /// A bus/device/function triple (device and function are masked to their widths).
    pub const fn new(bus: u8, device: u8, function: u8) -> PciAddress {
        PciAddress {
            bus,
            device: device & 31,
            function: function & 7,
        }
    }

    /// The address as virtio-drivers names it.
    pub fn device_function(self) -> DeviceFunction {
        DeviceFunction {
            bus: self.bus,
            device: self.device,
            function: self.function,
        }
    }

    /// Reads a 32-bit configuration register (`offset` is rounded down to 4).
    pub fn read_u32(self, offset: u8) -> u32 {
        PortCam.read_word(self.device_function(), offset)
    }

    /// Writes a 32-bit configuration register (`offset` is rounded down to 4).
    pub fn write_u32(self, offset: u8, value: u32) {
        PortCam.write_word(self.device_function(), offset, value);
    }

    /// Reads a 16-bit configuration register (`offset` is rounded down to 2).
    pub fn read_u16(self, offset: u8) -> u16 {
        (self.read_u32(offset) >> (8 * (offset & 2))) as u16
    }

    /// Writes a 16-bit configuration register (`offset` is rounded down to 2). A 16-bit port
    /// write, not virtio-drivers' dword access: rewriting the neighbour would clear the
    /// status register's write-1-to-clear bits next to the command register.
    pub fn write_u16(self, offset: u8, value: u16) {
        outl(CONFIG_ADDRESS, cam_address(self.device_function(), offset));
        outw(CONFIG_DATA + u16::from(offset & 2), value);
    }

    /// Reads an 8-bit configuration register.
    pub fn read_u8(self, offset: u8) -> u8 {
        (self.read_u32(offset) >> (8 * (offset & 3))) as u8
    }

    /// Writes an 8-bit configuration register (a byte port write, for the same reason as
    /// [`PciAddress::write_u16`]: chipset registers share dwords with others).
    pub fn write_u8(self, offset: u8, value: u8) {
        outl(CONFIG_ADDRESS, cam_address(self.device_function(), offset));
        outb(CONFIG_DATA + u16::from(offset & 3), value);
    }

    /// Sets bits of the command register (e.g. [`command::BUS_MASTER`] before DMA).
    pub fn enable(self, bits: u16) {
        let cmd = self.read_u16(reg::COMMAND);
        self.write_u16(reg::COMMAND, cmd | bits);
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// The dword selected by `offset` in mechanism #1's address register.
fn cam_address(df: DeviceFunction, offset: u8) -> u32 {
    0x8000_0000
        | (u32::from(df.bus) << 16)
        | (u32::from(df.device) << 11)
        | (u32::from(df.function) << 8)
        | u32::from(offset & 0xFC)
}

/// Configuration access mechanism #1 as virtio-drivers' [`ConfigurationAccess`]: an address
/// written to port 0xCF8 selects a dword of a function's configuration space, which is then
/// read or written at port 0xCFC. The one implementation of dword access: [`PciRoot`] (the
/// bus scan and the virtio transports) and [`PciAddress`] use it.
#[derive(Debug)]
pub struct PortCam;

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        // The guest runs on one CPU without interrupt handlers that touch PCI, so the
        // address/data pair is not interleaved.
        outl(CONFIG_ADDRESS, cam_address(df, offset));
        inl(CONFIG_DATA)
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        outl(CONFIG_ADDRESS, cam_address(df, offset));
        outl(CONFIG_DATA, data);
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

/// Reads a 32-bit configuration register of `bus:device.function`.
pub fn config_read(bus: u8, device: u8, function: u8, offset: u8) -> u32 {
    PciAddress::new(bus, device, function).read_u32(offset)
}

/// Writes a 32-bit configuration register of `bus:device.function`.
pub fn config_write(bus: u8, device: u8, function: u8, offset: u8, value: u32) {
    PciAddress::new(bus, device, function).write_u32(offset, value)
}

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// Memory below 4 GiB.
    Memory32,
    /// Memory anywhere (the BAR takes two slots).
    Memory64,
}

/// One base address register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// BAR number 0..=5 (the first slot of a 64-bit BAR).
    pub index: u8,
    /// I/O or memory.
    pub kind: BarKind,
    /// Assigned address (I/O port or physical address; 0 if unassigned).
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

impl fmt::Display for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            BarKind::Io => "io",
            BarKind::Memory32 => "mem",
            BarKind::Memory64 => "mem64",
        };
        write!(
            f,
            "BAR{} {kind} {:#x}+{:#x}",
            self.index, self.address, self.size
        )
    }
}

/// The virtio device types the kernel knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioKind {
    /// virtio-net (device id 0x1000 transitional, 0x1041 modern).
    Net,
    /// virtio-blk (0x1001, 0x1042).
    Block,
    /// virtio-console (0x1003, 0x1043).
    Console,
    /// virtio-rng (0x1005, 0x1044).
    Rng,
    /// virtio-balloon (0x1002, 0x1045).
    Balloon,
    /// virtio-scsi (0x1004, 0x1048).
    Scsi,
    /// Another virtio device (its modern device id).
    Other(u16),
}

impl VirtioKind {
    /// The name used in logs and the banner (`virtio-net`, `virtio-blk`, ...).
    pub fn name(self) -> &'static str {
        match self {
            VirtioKind::Net => "virtio-net",
            VirtioKind::Block => "virtio-blk",
            VirtioKind::Console => "virtio-console",
            VirtioKind::Rng => "virtio-rng",
            VirtioKind::Balloon => "virtio-balloon",
            VirtioKind::Scsi => "virtio-scsi",
            VirtioKind::Other(_) => "virtio",
        }
    }
}

/// One PCI function found at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// Where it is.
    pub address: PciAddress,
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Base class.
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision.
    pub revision: u8,
    /// Header type without the multi-function bit (0 device, 1 PCI bridge, 2 CardBus).
    pub header_type: u8,
    /// Subsystem vendor id (type-0 headers; 0 otherwise).
    pub subsystem_vendor_id: u16,
    /// Subsystem id (type-0 headers; 0 otherwise).
    pub subsystem_id: u16,
    /// Interrupt line assigned by the firmware.
    pub interrupt_line: u8,
    /// Interrupt pin (0 none, 1..=4 INTA..INTD).
    pub interrupt_pin: u8,
    /// Implemented BARs.
    pub bars: Vec<Bar>,
}

impl PciDevice {
    /// The virtio device type, if this is a virtio PCI device.
    pub fn virtio_kind(&self) -> Option<VirtioKind> {
        if self.vendor_id != VENDOR_VIRTIO || !(0x1000..=0x107f).contains(&self.device_id) {
            return None;
        }
        // Transitional devices (0x1000..0x103f) carry the virtio type in the subsystem id;
        // modern ones are 0x1040 + type.
        let virtio_type = if self.device_id >= 0x1040 {
            self.device_id - 0x1040
        } else {
            match self.device_id {
                0x1000 => 1,
                0x1001 => 2,
                0x1002 => 5,
                0x1003 => 3,
                0x1004 => 8,
                0x1005 => 4,
                _ => self.subsystem_id,
            }
        };
        Some(match virtio_type {
            1 => VirtioKind::Net,
            2 => VirtioKind::Block,
            3 => VirtioKind::Console,
            4 => VirtioKind::Rng,
            5 => VirtioKind::Balloon,
            8 => VirtioKind::Scsi,
            other => VirtioKind::Other(other),
        })
    }

    /// The BAR with number `index`, if implemented.
    pub fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.iter().find(|bar| bar.index == index)
    }

    /// A short description of the class.
    pub fn class_name(&self) -> &'static str {
        match (self.class, self.subclass) {
            (0x01, 0x00) => "SCSI storage",
            (0x01, 0x01) => "IDE storage",
            (0x01, 0x06) => "SATA storage",
            (0x01, 0x08) => "NVMe storage",
            (0x01, _) => "storage",
            (0x02, 0x00) => "Ethernet",
            (0x02, _) => "network",
            (0x03, _) => "display",
            (0x04, _) => "multimedia",
            (0x05, _) => "memory",
            (0x06, 0x00) => "host bridge",
            (0x06, 0x01) => "ISA bridge",
            (0x06, 0x04) => "PCI bridge",
            (0x06, _) => "bridge",
            (0x07, _) => "communication",
            (0x08, _) => "system",
            (0x0C, 0x03) => "USB",
            (0x0C, 0x05) => "SMBus",
            (0x0C, _) => "serial bus",
            (0xFF, _) => "unassigned class",
            _ => "other",
        }
    }
}

impl fmt::Display for PciDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04x}:{:04x} class {:02x}.{:02x}.{:02x} ({})",
            self.address,
            self.vendor_id,
            self.device_id,
            self.class,
            self.subclass,
            self.prog_if,
            self.class_name()
        )?;
        if let Some(kind) = self.virtio_kind() {
            write!(f, " {}", kind.name())?;
        }
        for bar in &self.bars {
            write!(f, " {bar}")?;
        }
        Ok(())
    }
}

/// Finds every PCI function, following bridges from bus 0.
pub fn enumerate() -> Vec<PciDevice> {
    let mut devices = Vec::new();
    let mut seen = [false; 256];
    scan_bus(0, &mut seen, &mut devices);
    devices
}

/// Probes the functions on `bus` (virtio-drivers' [`PciRoot::enumerate_bus`] finds them)
/// and follows bridges to their secondary buses. The rest of a function's description (BAR
/// sizes, subsystem, interrupt) is read by [`probe`]: virtio-drivers sizes BARs with decoding
/// switched off, which a host bridge must not see (RAM may sit behind it), and reads the six
/// BARs of a type-0 header only (a bridge has two).
fn scan_bus(bus: u8, seen: &mut [bool; 256], devices: &mut Vec<PciDevice>) {
    if core::mem::replace(&mut seen[usize::from(bus)], true) {
        return;
    }
    let root = PciRoot::new(PortCam);
    for (df, info) in root.enumerate_bus(bus) {
        let address = PciAddress::new(df.bus, df.device, df.function);
        let found = probe(address);
        let secondary = (info.header_type == HeaderType::PciPciBridge)
            .then(|| address.read_u8(reg::SECONDARY_BUS));
        devices.push(found);
        if let Some(secondary) = secondary.filter(|&b| b != 0) {
            scan_bus(secondary, seen, devices);
        }
    }
}

fn probe(address: PciAddress) -> PciDevice {
    let class_rev = address.read_u32(reg::CLASS_REVISION);
    let header_type = address.read_u8(reg::HEADER_TYPE) & 0x7F;
    let bar_count = match header_type {
        0 => 6,
        1 => 2,
        _ => 0,
    };
    let (subsystem_vendor_id, subsystem_id) = if header_type == 0 {
        (
            address.read_u16(reg::SUBSYSTEM_VENDOR_ID),
            address.read_u16(reg::SUBSYSTEM_ID),
        )
    } else {
        (0, 0)
    };
    PciDevice {
        address,
        vendor_id: address.read_u16(reg::VENDOR_ID),
        device_id: address.read_u16(reg::DEVICE_ID),
        class: (class_rev >> 24) as u8,
        subclass: (class_rev >> 16) as u8,
        prog_if: (class_rev >> 8) as u8,
        revision: class_rev as u8,
        header_type,
        subsystem_vendor_id,
        subsystem_id,
        interrupt_line: address.read_u8(reg::INTERRUPT_LINE),
        interrupt_pin: address.read_u8(reg::INTERRUPT_PIN),
        // Host bridges keep decoding while sized (as Linux does): RAM may sit behind them.
        bars: read_bars(address, bar_count, class_rev >> 16 != 0x0600),
    }
}

/// Reads the BARs and measures their sizes (writing all ones and reading back, with decoding
/// switched off meanwhile, unless `quiesce` is false, so the device does not claim a bogus
/// range).
fn read_bars(address: PciAddress, count: u8, quiesce: bool) -> Vec<Bar> {
    let mut bars = Vec::new();
    if count == 0 {
        return bars;
    }
    let cmd = address.read_u16(reg::COMMAND);
    if quiesce {
        address.write_u16(
            reg::COMMAND,
            cmd & !(command::IO_SPACE | command::MEMORY_SPACE),
        );
    }
    let mut index = 0;
    while index < count {
        let offset = reg::BAR0 + index * 4;
        let low = address.read_u32(offset);
        address.write_u32(offset, 0xFFFF_FFFF);
        let low_mask = address.read_u32(offset);
        address.write_u32(offset, low);
        let this = index;
        index += 1;
        if low_mask == 0 {
            continue; // not implemented
        }
        if low & 1 == 1 {
            let mask = low_mask & 0xFFFF_FFFC;
            let size = u64::from((!mask).wrapping_add(1) & 0xFFFF);
            bars.push(Bar {
                index: this,
                kind: BarKind::Io,
                address: u64::from(low & 0xFFFF_FFFC),
                size,
                prefetchable: false,
            });
            continue;
        }
        let prefetchable = low & 0x8 != 0;
        if (low >> 1) & 3 == 2 && index < count {
            let high_offset = offset + 4;
            let high = address.read_u32(high_offset);
            address.write_u32(high_offset, 0xFFFF_FFFF);
            let high_mask = address.read_u32(high_offset);
            address.write_u32(high_offset, high);
            index += 1;
            let mask = (u64::from(high_mask) << 32) | u64::from(low_mask & 0xFFFF_FFF0);
            bars.push(Bar {
                index: this,
                kind: BarKind::Memory64,
                address: (u64::from(high) << 32) | u64::from(low & 0xFFFF_FFF0),
                size: (!mask).wrapping_add(1),
                prefetchable,
            });
        } else {
            let mask = low_mask & 0xFFFF_FFF0;
            bars.push(Bar {
                index: this,
                kind: BarKind::Memory32,
                address: u64::from(low & 0xFFFF_FFF0),
                size: u64::from((!mask).wrapping_add(1)),
                prefetchable,
            });
        }
    }
    if quiesce {
        address.write_u16(reg::COMMAND, cmd);
    }
    bars
}
