//! VM0: the microkernel in a KVM VM of its own (`vmm --microkernel`).
//!
//! The kernel (`microkernel/kernel`) and its boot module, the root task with the test
//! tasks (`microkernel/user`, `mktest`), are built by `vmm/build.rs` and embedded here,
//! so the vmm needs nothing installed. `boot` loads both ELFs and writes the boot
//! information (`microkernel::bootinfo`); `run` runs the one vCPU and serves VM0's
//! ports; `bench` counts the instructions the kernel executes by single-stepping.
//!
//! VM0's devices are ports (see the table in `layout`): the console (COM1's transmit
//! register, copied to stdout), exit-with-status, raise-IOAPIC-line (the interrupt
//! source for interrupts-as-IPC tests), and the single-step counter switch. In hosted
//! mode VM0 also has the guest's virtio devices as its own virtio-mmio devices (native
//! `virtio` code and backends), which its device tasks drive. Nothing else: no ACPI, no
//! PIT, no UART model.

pub mod bench;
pub mod boot;
pub mod guest;
pub mod run;

/// The kernel ELF.
pub static KERNEL_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mk-kernel.elf"));
/// The boot module: the root task and test tasks.
pub static ROOT_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mktest.elf"));

/// VM0's RAM: the kernel (about 58 MiB with its 56 MiB heap, which holds the mapping
/// database: a hosted guest's RAM is three mappings per page, one more per device
/// task and one for a device task being restarted), 4 MiB of page-table
/// frames, and the root task's pool (the rest, about 9 MiB; the test tasks use a few
/// hundred KiB). A hosted guest's RAM is added to this. Small on purpose: the kernel
/// maps the pool page by page at boot, which takes about 2 s per 1,000 pages on
/// kvm-pvm, where guest ring 0 is emulated. (Heap pages the kernel never touches cost
/// the host nothing.)
pub const VM0_MEMORY: u64 = 72 << 20;

/// The most RAM a hosted guest may have: the mapping database records every 4 KiB page
/// of it three times (root, guest server, guest) and once per device task in the
/// kernel heap (`run::check_mappings` refuses what would not fit).
pub const MAX_HOSTED_MEMORY: u64 = 128 << 20;

/// What the root task does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Boot and report.
    Boot,
    /// Run every test task: `PASS name` / `FAIL name` lines, status 0 iff all pass.
    Selftest,
    /// The IPC micro-benchmark.
    BenchIpc,
    /// The guest-exit micro-benchmark: the exit-loop guest with this many null exits,
    /// natively, then hosted.
    BenchExit(u32),
    /// Hosted mode: a guest server runs a Linux guest with `mib` MiB of RAM and
    /// `devices` virtio devices (device tasks in VM0); `faults`: the guest may crash a
    /// device task on purpose (`--test-device-faults`); `pairing`: queue
    /// notifications and device interrupts go through eventfds inside KVM (off with
    /// `--no-eventfd-pairing`); `seccomp`: VM0's device thread runs under its filter
    /// (off with `--no-seccomp`).
    Hosted {
        mib: u64,
        devices: u64,
        faults: bool,
        pairing: bool,
        seccomp: bool,
    },
}

impl Mode {
    pub fn raw(self) -> u64 {
        use microkernel::bootinfo::mode;
        match self {
            Mode::Boot => mode::BOOT,
            Mode::Selftest => mode::SELFTEST,
            Mode::BenchIpc => mode::BENCH,
            Mode::BenchExit(_) => mode::BENCH_EXIT,
            Mode::Hosted { mib, devices, .. } => {
                mode::word(mode::HOSTED, mode::hosted(mib, devices))
            }
        }
    }
}

pub use run::{run, run_hosted};
