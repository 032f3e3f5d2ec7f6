//! What a freestanding binary needs: the panic handler (print, exit 3) and the C
//! memory functions and unwinding personality the precompiled libraries refer to.

use core::arch::asm;

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::println!("task panic: {info}");
    crate::port::exit(3)
}

// The C memory functions and unwinding personality, shared with the kernel.
#[path = "../../freestanding/mem.rs"]
mod mem;

/// Raise an invalid-opcode exception (#UD), which the kernel reports to the
/// thread's supervisor.
pub fn crash() -> ! {
    // SAFETY: UD2 only raises #UD; the kernel handles it as a fault of this thread.
    unsafe { asm!("ud2", options(noreturn)) }
}
