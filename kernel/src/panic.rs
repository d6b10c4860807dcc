//! The panic handler: print the message and location, power off with [`GuestExit::Panic`]
//! (or [`GuestExit::OutOfMemory`] when the allocator gave up).
//!
//! With `panic = "abort"` nothing unwinds; `rust_eh_personality` only exists because the
//! precompiled `core` (built with unwinding) refers to it.

use core::fmt::{self, Write as _};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use qcow_metal::config::GuestExit;

use crate::power;
use crate::serial::Serial;

static PANICKING: AtomicBool = AtomicBool::new(false);

/// Matches the start of a formatted message without allocating.
struct Prefix<'a> {
    want: &'a [u8],
    at: usize,
    matched: bool,
}

impl fmt::Write for Prefix<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.at == self.want.len() {
                self.matched = true;
                return Err(fmt::Error);
            }
            if self.want[self.at] != b {
                return Err(fmt::Error);
            }
            self.at += 1;
        }
        self.matched = self.at == self.want.len();
        Ok(())
    }
}

/// The message `alloc` panics with when an allocation fails (`handle_alloc_error`).
fn is_out_of_memory(info: &PanicInfo<'_>) -> bool {
    let mut prefix = Prefix {
        want: b"memory allocation of ",
        at: 0,
        matched: false,
    };
    let _ = write!(prefix, "{}", info.message());
    prefix.matched
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    crate::cpu::disable_interrupts();
    if PANICKING.swap(true, Ordering::Relaxed) {
        // A panic while panicking (e.g. in formatting): just stop.
        Serial.write_str("\npanic while panicking\n").ok();
        power::shutdown(GuestExit::Panic);
    }
    let _ = write!(Serial, "\nPANIC: {}", info.message());
    if let Some(location) = info.location() {
        let _ = write!(
            Serial,
            "\n  at {}:{}:{}",
            location.file(),
            location.line(),
            location.column()
        );
    }
    let _ = writeln!(Serial, "\n  at {} ms since power-on", crate::time::now_ms());
    if is_out_of_memory(info) {
        crate::heap::report();
        power::shutdown(GuestExit::OutOfMemory);
    }
    power::shutdown(GuestExit::Panic)
}

/// Referenced by the precompiled `core`; never called with `panic = "abort"`.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

/// Referenced by the precompiled `alloc` (built with unwinding) on cleanup paths that
/// `panic = "abort"` never takes; linking needs the symbol.
#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    crate::cpu::halt_forever()
}
