//! What the precompiled `core` and `alloc` expect from a C runtime that freestanding
//! binaries do not have: the memory functions the compiler calls (as x86 string
//! instructions) and the unwinding personality. One copy, compiled into both the kernel
//! (`arch/x86_64/mem.rs`) and the user runtime (`mkrt::lang`) with `#[path]`, so the
//! symbols are part of each binary's own crate and always linked.
//!
//! Preconditions of every function: the caller guarantees the ranges are valid for `n`
//! bytes, and the direction flag is clear (the x86-64 ABI's state at calls).

use core::arch::asm;

#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and do not overlap; DF is 0.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags))
    };
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize + n) {
        // SAFETY: copying forward is correct when dst is below src or they do not overlap.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: overlap with dst above src: copy backward from the last byte, then clear DF.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             inout("rcx") n => _, options(nostack))
    };
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid; DF is 0.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags))
    };
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges hold `n` bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled `alloc` refers to the unwinding personality; with panic=abort
/// nothing unwinds, so it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
