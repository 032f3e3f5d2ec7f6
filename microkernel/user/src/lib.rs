//! `mkrt`: the user-level runtime for tasks on the microkernel.
//!
//! System-call stubs (`sys`), the message API on top of `ipc` (`msg`), console output
//! through `debug_write` (`print`), a page pool for the root task (`pool`), a bump heap (`heap`), the VM0
//! test ports (`port`), the symbols a freestanding binary needs (`lang`), device
//! registers and mapped memory windows (`mmio`), and a virtio-mmio driver for VM0's
//! own devices (`vdriver`, the backends of hosted mode's device tasks).
//!
//! Design rules: every kernel call goes through `sys::syscall`, the only inline
//! assembly besides `port` and `lang`; raw pointers only in `mmio` and `heap`. Results
//! are `Result<_, u64>` with the raw status code (compare with `abi::Error::X as u64`).
//! Nothing in `mkrt` allocates; the heap is for the device models of device tasks.

#![no_std]

pub use microkernel::abi;
pub use microkernel::bootinfo;

pub mod heap;
pub mod lang;
pub mod mmio;
pub mod msg;
pub mod pool;
pub mod port;
pub mod print;
pub mod sys;
pub mod vdriver;
