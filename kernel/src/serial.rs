//! The console: a 16550 UART at COM1 (I/O port `0x3F8`), polled, 115200 8N1.
//!
//! QEMU connects it to the host with `-serial stdio` or `-serial file:PATH`. The guest reads
//! its input only for the runner's answers to grow requests ([`crate::hostfile`], polled with
//! [`read_byte`]). Writes take no lock, so the exception and panic paths
//! can always print (the guest runs on one CPU and prints nothing from interrupt handlers).
//! `\n` goes out as `\r\n`, as serial terminals expect.

use core::fmt;

use crate::cpu::{inb, outb};

/// I/O base of COM1.
pub const COM1: u16 = 0x3F8;

const DATA: u16 = COM1;
const INT_ENABLE: u16 = COM1 + 1;
const FIFO_CTRL: u16 = COM1 + 2;
const LINE_CTRL: u16 = COM1 + 3;
const MODEM_CTRL: u16 = COM1 + 4;
const LINE_STATUS: u16 = COM1 + 5;
/// LSR bit 5: the transmit holding register is empty.
const THR_EMPTY: u8 = 1 << 5;
/// LSR bit 0: a received byte is waiting.
const DATA_READY: u8 = 1;

/// Programs COM1: no interrupts, 115200 baud (divisor 1), 8N1, FIFOs on, DTR/RTS set.
pub fn init() {
    outb(INT_ENABLE, 0x00);
    outb(LINE_CTRL, 0x80); // DLAB: the next two writes are the divisor
    outb(DATA, 0x01);
    outb(INT_ENABLE, 0x00);
    outb(LINE_CTRL, 0x03);
    outb(FIFO_CTRL, 0xC7);
    outb(MODEM_CTRL, 0x03);
}

/// Sends one byte, waiting (bounded) for room in the transmitter.
pub fn write_byte(byte: u8) {
    // A real UART drains a byte in ~87 us at 115200; QEMU's is always ready. The bound keeps
    // a missing or wedged UART from hanging the guest.
    for _ in 0..100_000 {
        if inb(LINE_STATUS) & THR_EMPTY != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    outb(DATA, byte);
}

/// The next received byte, if one is waiting (polled, never blocks).
pub fn read_byte() -> Option<u8> {
    (inb(LINE_STATUS) & DATA_READY != 0).then(|| inb(DATA))
}

/// Sends bytes, turning `\n` into `\r\n`.
pub fn write_bytes(bytes: &[u8]) {
    for &byte in bytes {
        if byte == b'\n' {
            write_byte(b'\r');
        }
        write_byte(byte);
    }
}

/// A `fmt::Write` handle on COM1 (zero-sized; any number may exist).
#[derive(Debug, Clone, Copy, Default)]
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

impl embedded_io::ErrorType for Serial {
    type Error = core::convert::Infallible;
}

impl embedded_io::Write for Serial {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        write_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Prints to the console without a log prefix (the banner, fatal errors).
#[macro_export]
macro_rules! println {
    () => { $crate::serial::write_bytes(b"\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::serial::Serial, $($arg)*);
    }};
}
