//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`.
//!
//! On the linux-gnu target these normally come from libc, which the kernel does not link.
//! They are on the I/O path (every block and packet buffer moves through them), so the copies
//! use `rep movsb`/`rep stosb`, which current CPUs (ERMSB) and QEMU's TCG run as bulk copies.
//! The comparisons go eight bytes at a time. None of them may call into code that could
//! itself be compiled into a call to them.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest`; the ranges must not overlap.
///
/// # Safety
/// `dest` and `src` must be valid for `n` bytes and not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; `rep movsb` copies forwards (DF is clear, as
    // the ABI requires).
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`; the ranges may overlap.
///
/// # Safety
/// `dest` and `src` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // `dest` is below `src` or past its end: a forward copy never reads a byte it wrote.
        // SAFETY: as for `memcpy`; forward order is safe for this overlap.
        unsafe { memcpy(dest, src, n) }
    } else {
        // `dest` is inside `src..src+n`: copy backwards, from the last byte.
        // SAFETY: the caller guarantees both ranges; DF is set for the copy and cleared after,
        // so the ABI's DF=0 holds again on return.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dest.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            );
        }
        dest
    }
}

/// Fills `n` bytes at `dest` with the low byte of `c`.
///
/// # Safety
/// `dest` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; `rep stosb` stores forwards.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// Compares `n` bytes: <0, 0 or >0 as the first differing byte of `a` is below, equal or
/// above that of `b`.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`, inside both ranges.
        let (x, y) = unsafe {
            (
                a.add(i).cast::<u64>().read_unaligned(),
                b.add(i).cast::<u64>().read_unaligned(),
            )
        };
        if x != y {
            // The first differing byte in memory order is the lowest differing byte of the
            // little-endian words; big-endian words compare in memory order.
            return if u64::from_be(x) < u64::from_be(y) {
                -1
            } else {
                1
            };
        }
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`, inside both ranges.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Compares `n` bytes for equality: 0 if equal, non-zero otherwise.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
