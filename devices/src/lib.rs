//! Device models shared by the vmm's native mode and the microkernel's device tasks.
//!
//! Design rules:
//! - `virtio` is the `no_std` + `alloc` core: transports, queues and device models that
//!   see the guest only through small traits (`GuestMemory`, `Interrupt`, and one
//!   backend trait per device). It builds without the `std` feature, for VM0 tasks.
//! - `host` (feature `std`) implements those traits over vm-memory, eventfds, files,
//!   tap devices and Unix sockets; `serial` (vm-superio's UART) is host-side too.
//! - `platform` (power, reset, panic, exit-status ports) and `uart` (a transmit-only
//!   16550A) are `no_std`: native mode and hosted mode's guest server share them.
//! - Everything the guest writes is untrusted. A device never panics on guest input;
//!   unknown registers read as all ones (port I/O) or zero (virtio) and ignore writes.
//! - Devices do not decide the fate of the VM. They report what the guest asked for
//!   (`GuestEvent`) and the vmm acts on it.

#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod virtio;

#[cfg(feature = "std")]
pub mod host;
pub mod platform;
#[cfg(feature = "std")]
pub mod serial;
pub mod uart;

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
