//! The boot protocol between the vmm and the kernel in VM0, and the fixed user-space
//! layout the kernel and the root task agree on.
//!
//! The vmm loads the kernel ELF and the root task's image (the boot module), writes a
//! [`BootInfo`] as little-endian words at guest-physical `BOOT_INFO_ADDR`, and starts the
//! vCPU in 64-bit mode at the kernel entry with `rsi` pointing at it. Plain data: the
//! encoding is a fixed array of words so both sides agree without shared layouts.

/// `BootInfo::to_words()[0]`.
pub const MAGIC: u64 = 0x4d4b_424f_4f54_0001;
/// Root image regions the vmm can hand over.
pub const MAX_REGIONS: usize = 8;
/// Words in the encoded boot information.
pub const WORDS: usize = 7 + 4 * MAX_REGIONS;

/// What the root task should do (passed to it in `rdx`).
pub mod mode {
    /// Boot, say hello, power off.
    pub const BOOT: u64 = 0;
    /// Run every test task, print PASS/FAIL lines, exit with 0 iff all passed.
    pub const SELFTEST: u64 = 1;
    /// The IPC micro-benchmark.
    pub const BENCH: u64 = 2;
    /// The guest-exit benchmark: a guest server runs the vmm's exit-loop guest with
    /// many exits and prints what they cost.
    pub const BENCH_EXIT: u64 = 3;
    /// Hosted mode: a guest server runs the Linux guest the vmm loads (firmware role);
    /// the argument is `hosted(RAM MiB, devices)`.
    pub const HOSTED: u64 = 4;

    /// The mode word: the mode in bits 0..8, its argument above.
    pub const fn word(mode: u64, argument: u64) -> u64 {
        mode | argument << 8
    }
    /// The mode and its argument from a mode word.
    pub const fn split(word: u64) -> (u64, u64) {
        (word & 0xff, word >> 8)
    }
    /// `HOSTED`'s argument: the guest's RAM in MiB (bits 0..24) and how many virtio
    /// devices the vmm gave VM0 for the guest (bits 24..32), one page each at
    /// `layout::DEVICES`; device `i` is the guest's device `i` too.
    pub const fn hosted(ram_mib: u64, devices: u64) -> u64 {
        ram_mib & 0xff_ffff | (devices & 0xff) << 24
    }
    /// The inverse of `hosted`: (RAM MiB, devices).
    pub const fn hosted_split(argument: u64) -> (u64, u64) {
        (argument & 0xff_ffff, (argument >> 24) & 0xff)
    }
}

/// The kernel's mapping-database limit (`Config::mappings`): mapped pages in all tasks
/// together. The vmm checks a hosted guest fits before it boots VM0.
pub const MAPPINGS: u64 = 1 << 18;

/// `BootInfo::flags`.
pub mod flags {
    /// Tasks enter the kernel with `int3` instead of `syscall`: kvm-pvm neither
    /// switches to ring 0 on SYSCALL nor delivers `int n` from user mode for a guest
    /// that is not PVM-aware (it raises #UD), but it delivers #BP. Passed to the root
    /// task in `r8`.
    pub const INT_SYSCALL: u64 = 1;
    /// Hosted mode, test only (`vmm --test-device-faults`): the guest may make a device
    /// task crash on purpose (a write to register 0xf00 of the device's window), to
    /// test that the root restarts it.
    pub const DEVICE_FAULTS: u64 = 2;
    /// Hosted mode: the guest's queue notifications and the device tasks' interrupts
    /// are wired through eventfds inside KVM (`layout::NOTIFY_IRQ_BASE`,
    /// `layout::DOORBELL_PHYS`); off with `vmm --no-eventfd-pairing`.
    pub const EVENTFD_PAIRING: u64 = 4;
}

/// The vector of the trap system-call entry (`int3`; same registers as SYSCALL).
pub const SYSCALL_VECTOR: u8 = 3;

/// User virtual layout (all inside the kernel's user range).
pub mod layout {
    /// First user address; the kernel owns the first GiB (identity map, supervisor).
    pub const USER_START: u64 = 0x4000_0000;
    /// End of the user range (the 3..4 GiB MMIO window stays the kernel's).
    pub const USER_END: u64 = 0xC000_0000;
    /// Where task images are linked.
    pub const IMAGE_BASE: u64 = 0x4000_0000;
    /// The root task's pool of free memory (every frame the kernel does not keep).
    pub const POOL_BASE: u64 = 0x5000_0000;
    /// Top of the root task's initial stack (`ROOT_STACK_SIZE` bytes below are mapped).
    pub const ROOT_STACK_TOP: u64 = 0x7fff_f000;
    pub const ROOT_STACK_SIZE: u64 = 64 << 10;
    /// Hosted mode: VM0's virtio-mmio device windows in the root's space (one page
    /// each, physical `DEVICE_PHYS + 4 KiB * i`), the root's to hand to device tasks.
    pub const DEVICES: u64 = 0x7000_0000;
    /// Where virtio device `i`'s window is, in VM0 and in the hosted guest alike:
    /// `DEVICE_PHYS + 4 KiB * i`, interrupt line (IOAPIC pin) `DEVICE_IRQ_BASE + i`.
    pub const DEVICE_PHYS: u64 = 0xd000_0000;
    pub const DEVICE_IRQ_BASE: u16 = 5;
    /// Eventfd pairing (`flags::EVENTFD_PAIRING`), per guest device `i`:
    /// - the guest's write to its `QueueNotify` register is an ioeventfd of the guest's
    ///   VM that is an irqfd of VM0's line `NOTIFY_IRQ_BASE + i`: the device task hears
    ///   the notification as an interrupt IPC, and the guest does not exit;
    /// - VM0's page `DOORBELL_PHYS + 4 KiB * i` (root virtual `DEVICES + 4 KiB *
    ///   (MAX_DEVICES + i)`) is a doorbell: a write to its first word (any value, any
    ///   width) is an ioeventfd of VM0 that is an irqfd of the guest's pin
    ///   `DEVICE_IRQ_BASE + i`.
    ///
    /// Neither passes through the vmm's user space.
    pub const NOTIFY_IRQ_BASE: u16 = 9;
    pub const DOORBELL_PHYS: u64 = DEVICE_PHYS + MAX_DEVICES * 4096;
    /// The most virtio devices (device tasks) a hosted guest has: the root names them
    /// all in the guest server's boot message.
    pub const MAX_DEVICES: u64 = 4;
    /// Pager-served region: any page here is filled with a fresh zero page on a fault.
    pub const LAZY_START: u64 = 0x8000_0000;
    pub const LAZY_END: u64 = 0xa000_0000;
}

/// One part of the root image: `size` bytes at `paddr` to be mapped at `vaddr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    pub vaddr: u64,
    pub paddr: u64,
    pub size: u64,
    /// `abi::Rights` bits.
    pub rights: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// Free physical memory for the kernel and the root task's pool.
    pub free_start: u64,
    pub free_end: u64,
    pub mode: u64,
    pub root_entry: u64,
    pub regions: [Region; MAX_REGIONS],
    pub nregions: u64,
    pub flags: u64,
}

impl BootInfo {
    pub fn to_words(&self) -> [u64; WORDS] {
        let mut w = [0; WORDS];
        w[..6].copy_from_slice(&[
            MAGIC,
            self.free_start,
            self.free_end,
            self.mode,
            self.root_entry,
            self.nregions,
        ]);
        w[WORDS - 1] = self.flags;
        for (i, r) in self.regions.iter().enumerate() {
            w[6 + 4 * i..10 + 4 * i].copy_from_slice(&[r.vaddr, r.paddr, r.size, r.rights]);
        }
        w
    }

    pub fn from_words(w: &[u64; WORDS]) -> Option<Self> {
        if w[0] != MAGIC || w[5] > MAX_REGIONS as u64 {
            return None;
        }
        let mut b = BootInfo {
            free_start: w[1],
            free_end: w[2],
            mode: w[3],
            root_entry: w[4],
            nregions: w[5],
            flags: w[WORDS - 1],
            ..Default::default()
        };
        for (i, r) in b.regions.iter_mut().enumerate() {
            let s = &w[6 + 4 * i..10 + 4 * i];
            *r = Region { vaddr: s[0], paddr: s[1], size: s[2], rights: s[3] };
        }
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut b = BootInfo {
            free_start: 1,
            free_end: 2,
            mode: 1,
            root_entry: 9,
            flags: 1,
            ..Default::default()
        };
        b.regions[0] = Region { vaddr: 0x4000_0000, paddr: 0x40_0000, size: 0x3000, rights: 5 };
        b.nregions = 1;
        assert_eq!(BootInfo::from_words(&b.to_words()), Some(b));
        assert_eq!(BootInfo::from_words(&[0; WORDS]), None);
    }
}

/// The hypercall interface between the kernel in VM0 and the vmm, for guest VMs.
///
/// A hypercall is `out dx, eax` to [`hyper::PORT`] with the operation in `eax` and its
/// arguments in `rdi`, `rsi`, `r8`, `r9`; the vmm reads them from the vCPU's registers.
/// A guest task is one VM (`task` = its task number); its address space is the VM's
/// physical memory, kept equal to the kernel's page table of that task page by page.
/// A guest exit comes the other way: the vmm writes [`hyper::ExitRecord`] at
/// [`hyper::EXIT_RECORD`] (VM0-physical) and pulses IOAPIC line [`hyper::EXIT_LINE`];
/// the vCPU stays stopped until `RESUME`. An exit VM0 has not answered within
/// [`hyper::REANNOUNCE_MS`] is announced again (same record, same `seq`); the kernel
/// takes each `seq` once, so a repeated announcement is harmless and a lost one is
/// not fatal. The record is a sequence lock: the vmm first sets `seq` to 0, then writes
/// the other words and `seq` last; the kernel reads `seq`, the words, `seq` again, and
/// skips a record whose `seq` is 0 or changed meanwhile (a late repeated announcement
/// that met the next exit being written; its own announcement follows).
pub mod hyper {
    /// The hypercall port (opened to the kernel only).
    pub const PORT: u16 = 0x513;
    /// Create the empty VM of guest task `rdi`.
    pub const CREATE: u32 = 1;
    /// Destroy the VM of guest task `rdi` (its vCPU stops where it is).
    pub const DESTROY: u32 = 2;
    /// Map guest-physical page `rsi` of task `rdi` to VM0-physical page `r8` with rights
    /// `r9` (`abi::Rights` bits; a mapped page is replaced).
    pub const MAP: u32 = 3;
    /// Unmap guest-physical page `rsi` of task `rdi`.
    pub const UNMAP: u32 = 4;
    /// Run vCPU thread `rsi` of task `rdi`: the first time, or after an exit, with `r8`
    /// the value an `in` or MMIO read returns, after pulsing (raise, lower) the guest's
    /// IOAPIC pins in the mask `r9` (bit n: pin n): interrupts that the answered access
    /// raised, such as a UART's transmitter-empty interrupt.
    pub const RESUME: u32 = 5;
    /// Change the rights of mapped guest-physical page `rsi` of task `rdi` to `r8`.
    pub const PROTECT: u32 = 6;
    /// Pulse the IOAPIC pins in the mask `rsi` of task `rdi`'s VM now, whether its vCPU
    /// runs, halts or waits in an exit (`guest_interrupt`: a device task's interrupt
    /// that answers no exit, such as a received frame).
    pub const INTERRUPT: u32 = 7;
    /// VM0-physical address of the exit record.
    pub const EXIT_RECORD: u64 = 0x6000;
    /// The IOAPIC line that announces an exit (not attachable by tasks).
    pub const EXIT_LINE: u16 = 23;
    /// The IOAPIC line on which the vmm asks the kernel to print what its threads wait
    /// for (`mk: thread ...` lines on VM0's console), when an exit has waited
    /// [`DUMP_AFTER_MS`] for VM0. Not attachable by tasks either.
    pub const DUMP_LINE: u16 = 22;
    /// How long an exit waits for `RESUME` before the vmm asks for that dump (once).
    pub const DUMP_AFTER_MS: u64 = 5_000;
    /// How long the vmm waits for `RESUME` before announcing an exit again.
    pub const REANNOUNCE_MS: u64 = 20;

    /// One exit, as six little-endian words at [`EXIT_RECORD`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ExitRecord {
        /// The vCPU thread's id (`ThreadId::raw`).
        pub vcpu: u64,
        /// `abi::guest::IO_IN`, ...
        pub kind: u64,
        pub size: u64,
        pub addr: u64,
        pub data: u64,
        /// The exit's number (from 1, increasing by one per exit; 0 while the record is
        /// being written).
        pub seq: u64,
    }

    impl ExitRecord {
        pub const WORDS: usize = 6;
        pub fn to_words(self) -> [u64; Self::WORDS] {
            [self.vcpu, self.kind, self.size, self.addr, self.data, self.seq]
        }
        pub fn from_words(w: [u64; Self::WORDS]) -> Self {
            Self { vcpu: w[0], kind: w[1], size: w[2], addr: w[3], data: w[4], seq: w[5] }
        }
    }
}
