//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`.
//!
//! On the linux-gnu target these normally come from libc, which the kernel does not link.
//! They are on the I/O path (every block and packet buffer moves through them). The copies
//! and fills move 64 bytes per iteration through SSE registers: QEMU's TCG runs `rep movsb`
//! one byte per step (measured in the guest: ~30 MiB/s, against ~600 MiB/s for this loop),
//! while each SSE load or store becomes a couple of host instructions. `rep movsb`/`rep
//! stosb` only finish the last < 64 bytes.
//! The comparisons go eight bytes at a time. None of them may call into code that could
//! itself be compiled into a call to them.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest`; the ranges must not overlap.
///
/// # Safety
/// `dest` and `src` must be valid for `n` bytes and not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges. 64 bytes per iteration (all four loads before
    // the stores, which also makes a forward overlapping copy with `dest < src` correct, as
    // `memmove` needs), then `rep movsb` for the last < 64 bytes (forwards: DF is clear, as
    // the ABI requires).
    unsafe {
        asm!(
            "shr rcx, 6",
            "jz 3f",
            "2:",
            "movups xmm0, [rsi]",
            "movups xmm1, [rsi + 16]",
            "movups xmm2, [rsi + 32]",
            "movups xmm3, [rsi + 48]",
            "movups [rdi], xmm0",
            "movups [rdi + 16], xmm1",
            "movups [rdi + 32], xmm2",
            "movups [rdi + 48], xmm3",
            "add rsi, 64",
            "add rdi, 64",
            "dec rcx",
            "jnz 2b",
            "3:",
            "mov rcx, rdx",
            "and rcx, 63",
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            in("rdx") n,
            out("xmm0") _,
            out("xmm1") _,
            out("xmm2") _,
            out("xmm3") _,
            options(nostack)
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
        // `dest` is inside `src..src+n`: copy backwards, 64-byte blocks from the end (each
        // block loaded whole before it is stored, so no unread source byte is overwritten),
        // then the first < 64 bytes with a backwards `rep movsb`.
        // SAFETY: the caller guarantees both ranges; DF is set only for the final `rep movsb`
        // and cleared after, so the ABI's DF=0 holds again on return.
        unsafe {
            asm!(
                "add rsi, rdx",
                "add rdi, rdx",
                "shr rcx, 6",
                "jz 3f",
                "2:",
                "sub rsi, 64",
                "sub rdi, 64",
                "movups xmm0, [rsi]",
                "movups xmm1, [rsi + 16]",
                "movups xmm2, [rsi + 32]",
                "movups xmm3, [rsi + 48]",
                "movups [rdi], xmm0",
                "movups [rdi + 16], xmm1",
                "movups [rdi + 32], xmm2",
                "movups [rdi + 48], xmm3",
                "dec rcx",
                "jnz 2b",
                "3:",
                "mov rcx, rdx",
                "and rcx, 63",
                "jz 4f",
                "dec rsi",
                "dec rdi",
                "std",
                "rep movsb",
                "cld",
                "4:",
                inout("rcx") n => _,
                inout("rdi") dest => _,
                inout("rsi") src => _,
                in("rdx") n,
                out("xmm0") _,
                out("xmm1") _,
                out("xmm2") _,
                out("xmm3") _,
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
    let pattern = u64::from(c as u8).wrapping_mul(0x0101_0101_0101_0101);
    // SAFETY: the caller guarantees the range. 64 bytes per iteration from an SSE register
    // holding the byte 16 times, then `rep stosb` (forwards) for the last < 64 bytes.
    unsafe {
        asm!(
            "movq xmm0, rax",
            "punpcklqdq xmm0, xmm0",
            "shr rcx, 6",
            "jz 3f",
            "2:",
            "movups [rdi], xmm0",
            "movups [rdi + 16], xmm0",
            "movups [rdi + 32], xmm0",
            "movups [rdi + 48], xmm0",
            "add rdi, 64",
            "dec rcx",
            "jnz 2b",
            "3:",
            "mov rcx, rdx",
            "and rcx, 63",
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("rdx") n,
            in("rax") pattern,
            out("xmm0") _,
            options(nostack)
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
