//! Device models shared by the vmm's native mode and (later) the microkernel's device tasks.
//!
//! Design rules:
//! - A device sees the guest only through the small interfaces in this crate: an I/O
//!   access (`PioDevice`), an interrupt line (`vm_superio::Trigger`), and its backend
//!   (a `Write` for console output, files for disks, ...).
//! - Everything the guest writes is untrusted. A device never panics on guest input;
//!   unknown registers read as all ones and ignore writes.
//! - Devices do not decide the fate of the VM. They report what the guest asked for
//!   (`GuestEvent`) and the vmm acts on it.

pub mod platform;
pub mod serial;

/// Something the guest asked of the platform that the vmm must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEvent {
    /// ACPI S5: the guest powered itself off.
    PowerOff,
    /// The guest asked for a reset (ACPI reset register or i8042 pulse).
    Reset,
    /// The guest kernel reported a panic (pvpanic).
    Panic,
    /// The guest's init passed out the status the vmm should exit with.
    ExitStatus(u8),
}

/// A device on the x86 I/O port bus. `offset` is relative to the device's base port.
pub trait PioDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u16, data: &[u8]) -> Option<GuestEvent>;
}
