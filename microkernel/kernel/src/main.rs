//! The microkernel as a freestanding x86_64 binary for VM0.
//!
//! The portable core (`microkernel` crate: IPC, mapping database, scheduler, faults,
//! interrupts) makes every decision; this binary is the machine underneath it:
//! `arch::x86_64` boots, enters and leaves the kernel, keeps the page tables and drives
//! the APICs. See `arch/x86_64/mod.rs` for the design rules.
//!
//! Built by `vmm/build.rs` for `x86_64-unknown-linux-gnu` with `#![no_std]`, panic=abort,
//! `-C relocation-model=static` and `kernel.ld`; the vmm embeds the ELF.

#![no_std]
#![no_main]

extern crate alloc;

mod arch;

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    arch::x86_64::console::panic(info)
}
