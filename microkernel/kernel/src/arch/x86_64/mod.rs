//! The x86_64 machine under the portable core.
//!
//! Design rules:
//! - One CPU, one kernel stack. The kernel runs with interrupts off from entry to exit;
//!   interrupts are taken only in user mode or in the idle loop, so no kernel code is
//!   ever interrupted (the precompiled `core` uses the red zone).
//! - Every entry saves the whole user state (GPRs, ip, sp, flags, FXSAVE area) into the
//!   running thread's `Ctx`, which lives in the core's thread table, then calls the
//!   core on a fresh kernel stack; every exit loads one `Ctx` and leaves by `sysretq`
//!   (entered by `syscall`) or `iretq` (entered by an interrupt or exception). Nothing
//!   kernel-side survives an exit: there are no kernel threads and no continuations.
//! - The core's page tables are the truth; `paging` mirrors them into real ones. The
//!   first GiB is identity mapped for the kernel only (physical = virtual), the MMIO
//!   window at 3..4 GiB holds the APICs; user space is 1..3 GiB.
//! - `unsafe` lives only in this directory, one `// SAFETY:` line per block.
//!
//! Files: `start` (entry from the vmm, boot sequence), `cpu` (GDT, TSS, IDT, MSRs,
//! control registers, port I/O), `entry` (assembly entry/exit paths and `Ctx`),
//! `trap` (from an entry to the core and back), `paging` (frames and page tables),
//! `apic` (LAPIC timer, IOAPIC lines), `heap` (the kernel allocator), `mem` (memcpy and friends), `console`.

pub mod apic;
pub mod console;
pub mod cpu;
pub mod entry;
pub mod heap;
pub mod mem;
pub mod paging;
pub mod start;
pub mod trap;
