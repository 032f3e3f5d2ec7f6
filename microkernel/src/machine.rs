//! What the portable core needs from the machine: the arch layer implements these traits.
//!
//! The core owns the decisions; the machine carries them out. The core never touches a
//! real page table or register: it keeps an abstract page table per task and tells the
//! machine every change as it happens ([`PageTables`]), and it reaches a thread's user
//! registers only through the saved [`Context`] that lives in the thread control block.

use crate::abi::{Rights, TaskId, ThreadId, ARG_COUNT, MR_COUNT, RET_COUNT};

/// The machine ran out of memory for page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoMemory;

/// The real page tables, kept equal to the core's abstract ones.
///
/// Pages are numbered (`vpn`, `pfn`: address >> 12). Each call changes one entry and
/// must be visible to the task when the kernel next returns to user mode (flush the TLB
/// entry if `task` is loaded). A present entry grants at least `rights`; the hardware
/// may imply read from write or execute.
pub trait PageTables {
    /// Create the empty address space `task`: user virtual memory, or the physical
    /// memory of a guest VM (whose mappings the machine turns into the VM's memory).
    fn create_space(&mut self, task: TaskId, kind: Space) -> Result<(), NoMemory>;
    /// Destroy `task`'s address space; the core has unmapped every page before.
    fn destroy_space(&mut self, task: TaskId);
    /// Enter a new mapping `vpn -> pfn`; `vpn` is currently unmapped in `task`.
    fn map(&mut self, task: TaskId, vpn: u64, pfn: u64, rights: Rights) -> Result<(), NoMemory>;
    /// Change the rights of the present mapping at `vpn` (never to none).
    fn protect(&mut self, task: TaskId, vpn: u64, rights: Rights);
    /// Remove the present mapping at `vpn`.
    fn unmap(&mut self, task: TaskId, vpn: u64);
}

/// What an address space is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// A task's user virtual addresses (`Config::user_start..user_end`).
    User,
    /// A guest VM's physical addresses (`0..abi::guest::PHYS_END`).
    Guest,
}

/// The saved user-mode state of one thread (registers, FPU state, ...), in whatever
/// layout the arch layer's entry code wants. The core reads system-call arguments and
/// message registers from it and writes results, message registers, ip and sp into it.
pub trait Context: Default {
    fn ip(&self) -> u64;
    fn set_ip(&mut self, ip: u64);
    fn sp(&self) -> u64;
    fn set_sp(&mut self, sp: u64);
    /// The call number and arguments the thread entered the kernel with.
    fn syscall(&self) -> (u64, [u64; ARG_COUNT]);
    fn mrs(&self) -> [u64; MR_COUNT];
    fn set_mrs(&mut self, mrs: &[u64; MR_COUNT]);
    /// The result registers of the system call the thread is returning from.
    fn set_ret(&mut self, ret: [u64; RET_COUNT]);
}

/// Everything the core calls on the machine.
pub trait Machine: PageTables {
    type Context: Context;
    /// Mask interrupt line `irq` (it was delivered and waits for an acknowledgement, or
    /// lost its handler).
    fn irq_mask(&mut self, irq: u16);
    /// Unmask interrupt line `irq`.
    fn irq_unmask(&mut self, irq: u16);
    /// Run guest vCPU `vcpu` of guest task `task`: the first time, or after an exit
    /// whose handler replied `value` (the value an `in` or MMIO read returns), after
    /// pulsing the guest's interrupt lines in the mask `pulse` (bit n: IOAPIC pin n).
    fn guest_resume(&mut self, vcpu: ThreadId, task: TaskId, value: u64, pulse: u32);
    /// Pulse the IOAPIC pins in `pins` (bit n: pin n) of guest task `task` now, while
    /// its vCPU runs or waits.
    fn guest_interrupt(&mut self, task: TaskId, pins: u32);
    /// Print `len` bytes of physical frame `pfn` starting at `offset` (within the frame)
    /// on the kernel console.
    fn debug_write(&mut self, pfn: u64, offset: u64, len: u64);
}

/// A thread's user registers as plain fields: the `Context` of the host-side tests and
/// of the fuzz targets (feature `invariants`), where no real CPU state exists.
#[cfg(any(test, feature = "invariants"))]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostRegs {
    pub ip: u64,
    pub sp: u64,
    pub nr: u64,
    pub args: [u64; ARG_COUNT],
    pub mrs: [u64; MR_COUNT],
    pub ret: [u64; RET_COUNT],
}

#[cfg(any(test, feature = "invariants"))]
impl Context for HostRegs {
    fn ip(&self) -> u64 {
        self.ip
    }
    fn set_ip(&mut self, ip: u64) {
        self.ip = ip;
    }
    fn sp(&self) -> u64 {
        self.sp
    }
    fn set_sp(&mut self, sp: u64) {
        self.sp = sp;
    }
    fn syscall(&self) -> (u64, [u64; ARG_COUNT]) {
        (self.nr, self.args)
    }
    fn mrs(&self) -> [u64; MR_COUNT] {
        self.mrs
    }
    fn set_mrs(&mut self, mrs: &[u64; MR_COUNT]) {
        self.mrs = *mrs;
    }
    fn set_ret(&mut self, ret: [u64; RET_COUNT]) {
        self.ret = ret;
    }
}
