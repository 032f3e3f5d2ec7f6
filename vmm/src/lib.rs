//! `vmm`: a KVM virtual machine monitor that boots unmodified Linux, natively (this
//! crate drives KVM directly, like Firecracker) or, later, hosted on an L4-style
//! microkernel. See the repository README for the architecture.
//!
//! Module map: `layout` (guest physical memory map), `boot` (kernel/initrd/zero page),
//! `acpi` (tables), `cpuid` and `regs` (vCPU state), `vm` (building and running a guest),
//! `bus`, `irq` and `virtio` (devices: port bus, irqfds, virtio-mmio bus, event loop), `mk` (VM0: the embedded microkernel), `console` (terminal and stdin), `pvm` (kvm-pvm
//! quirks), `size` (memory-size parsing), `seccomp` (per-thread system-call filters).

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod console;
pub mod cpuid;
pub mod irq;
pub mod layout;
pub mod mk;
pub mod pvm;
pub mod regs;
pub mod seccomp;
pub mod size;
pub mod virtio;
pub mod vm;

/// Everything that stops the vmm from running a guest.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Kvm(String),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
    #[error("{0}")]
    Io(std::io::Error),
}
