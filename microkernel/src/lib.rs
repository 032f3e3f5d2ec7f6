//! The portable core of an L4-style microkernel.
//!
//! Tasks (address spaces) and threads, synchronous unbuffered IPC with short messages in
//! message registers, map/grant/unmap of flexpages with a mapping database, pagers that
//! receive page faults as IPC, interrupts as IPC, and a priority round-robin scheduler.
//! No arch code: `arch/x86_64` drives this crate through the entry points of
//! [`Kernel`] and implements [`Machine`]. The system calls are listed in
//! `microkernel/SYSCALLS.md`.
//!
//! Design rules:
//! - All kernel state is one [`Kernel`] value. Every system call is one function over it;
//!   every kernel entry (`syscall`, `page_fault`, `exception`, `interrupt`, `tick`)
//!   returns a [`Next`] that tells the arch layer which thread to run.
//! - Register values from user mode are decoded by total functions into typed values
//!   before use; no register value can make the kernel panic. Arithmetic on user values
//!   is checked, loops are bounded by table sizes, the kernel never recurses.
//! - User addresses are allegations: believed only after the caller's own page table
//!   shows them mapped with the rights needed (see `task.rs`).
//! - Kernel memory is bounded by [`Config`]: thread, task and interrupt tables are
//!   allocated at boot, mapping nodes are capped. Exhaustion is an error code.
//! - Page tables are the core's: the machine mirrors each change as it is made.
//! - No `unsafe`.
//!
//! How the arch layer drives the core:
//! 1. Boot: [`Kernel::new`], then [`Kernel::root_map`] for every physical page the root
//!    task (the root pager) owns, then [`Kernel::boot`] with the root thread's ip/sp.
//! 2. On every entry from user mode save the user state into
//!    `context_mut(current())`, then call [`Kernel::syscall`], [`Kernel::page_fault`]
//!    or [`Kernel::exception`]; for device interrupts [`Kernel::interrupt`], for the
//!    timer [`Kernel::tick`] (also when entered from idle).
//! 3. Act on the returned [`Next`]: `Resume` returns to the same thread, `Switch`
//!    loads the page table of `task` and returns to `thread`, `Idle` waits for an
//!    interrupt. Either way the registers to load are the thread's [`Context`], which
//!    the core may have changed (results, messages, ip/sp).
//! 4. Implement [`Machine`]: page-table changes, interrupt masking, console output.
//!    The `alloc` heap must hold the tables that [`Config`] sizes.
//!
//! Files: `abi` (the ABI shared with user space), `bootinfo` (the vmm-to-kernel boot
//! protocol and the user layout), `kernel` (state, boot), `thread`,
//! `task`, `ipc`, `fastpath` (call/reply_wait in one straight line), `mapdb`, `sched`,
//! `fault`, `route` (which thread answers which guest exits), `irq`, `syscalls` (decoder and dispatcher),
//! `machine` (the arch interface), `list` (intrusive queues).

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod abi;
pub mod bootinfo;
mod dump;
mod fastpath;
mod fault;
mod ipc;
mod irq;
mod kernel;
mod list;
mod machine;
mod mapdb;
mod route;
mod sched;
mod syscalls;
mod task;
mod thread;

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod testing;

pub use dump::{IrqSummary, ThreadSummary};
pub use fault::{Fault, GuestExit};
pub use kernel::{BootError, Config, Kernel, Next};
#[cfg(any(test, feature = "invariants"))]
pub use machine::HostRegs;
pub use machine::{Context, Machine, NoMemory, PageTables, Space};
pub use syscalls::{Control, IrqOp, Route, Syscall, TaskKind};
