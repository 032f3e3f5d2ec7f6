//! Small platform devices: ACPI power management, the i8042 reset line, pvpanic and the
//! exit-status port. Each is a few registers with no state beyond what is written here.

use crate::{GuestEvent, PioDevice};

/// The `SLP_TYP` value the DSDT's `\_S5` package announces for soft-off.
pub const S5_SLEEP_TYPE: u8 = 5;
/// `SLP_EN` bit of the hardware-reduced sleep control register.
const SLEEP_ENABLE: u8 = 1 << 5;
/// Value the FADT tells the guest to write to the reset register.
pub const ACPI_RESET_VALUE: u8 = 0x1;

/// ACPI hardware-reduced sleep control/status register and reset register (one port).
///
/// Writing `SLP_TYP = S5` with `SLP_EN` is a power-off; writing `ACPI_RESET_VALUE` is a reset.
#[derive(Debug, Default)]
pub struct AcpiPm;

impl PioDevice for AcpiPm {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Sleep status: never "woken", nothing pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<GuestEvent> {
        let (0, &[value]) = (offset, data) else {
            return None;
        };
        if value == ACPI_RESET_VALUE {
            return Some(GuestEvent::Reset);
        }
        let sleep_type = (value >> 2) & 0x7;
        (value & SLEEP_ENABLE != 0 && sleep_type == S5_SLEEP_TYPE).then_some(GuestEvent::PowerOff)
    }
}

/// The i8042 keyboard controller's command port, reduced to what Linux uses to reset
/// (`reboot=k`): command 0xfe pulses the CPU reset line. Reads report an idle controller.
#[derive(Debug, Default)]
pub struct I8042Reset;

impl PioDevice for I8042Reset {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> Option<GuestEvent> {
        (data == [0xfe]).then_some(GuestEvent::Reset)
    }
}

/// QEMU-compatible pvpanic: the guest writes bit 0 (`PVPANIC_PANICKED`) when it panics.
#[derive(Debug, Default)]
pub struct PvPanic;

/// pvpanic capability bits read by the guest driver: "panicked" and "crash loaded".
const PVPANIC_CAPABILITIES: u8 = 0b11;

impl PioDevice for PvPanic {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_CAPABILITIES;
        }
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> Option<GuestEvent> {
        (data.first().copied().unwrap_or(0) & 1 != 0).then_some(GuestEvent::Panic)
    }
}

/// One write-only byte: the status the vmm exits with when the guest powers off.
/// This is how a guest's init reports a test command's exit status.
#[derive(Debug, Default)]
pub struct ExitPort;

impl PioDevice for ExitPort {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<GuestEvent> {
        match (offset, data) {
            (0, &[status]) => Some(GuestEvent::ExitStatus(status)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_pm_distinguishes_poweroff_reset_and_other_sleep_states() {
        let mut pm = AcpiPm;
        assert_eq!(
            pm.write(0, &[(S5_SLEEP_TYPE << 2) | SLEEP_ENABLE]),
            Some(GuestEvent::PowerOff)
        );
        assert_eq!(pm.write(0, &[ACPI_RESET_VALUE]), Some(GuestEvent::Reset));
        // S3 (suspend) is not supported: nothing happens.
        assert_eq!(pm.write(0, &[(3 << 2) | SLEEP_ENABLE]), None);
        // S5 type without SLP_EN is only a preparation.
        assert_eq!(pm.write(0, &[S5_SLEEP_TYPE << 2]), None);
        // Wide or offset accesses are ignored.
        assert_eq!(pm.write(0, &[0x34, 0]), None);
        assert_eq!(pm.write(1, &[0x34]), None);
    }

    #[test]
    fn i8042_resets_only_on_pulse_command() {
        let mut k = I8042Reset;
        assert_eq!(k.write(0, &[0xfe]), Some(GuestEvent::Reset));
        assert_eq!(k.write(0, &[0xad]), None);
    }

    #[test]
    fn pvpanic_and_exit_port() {
        let mut p = PvPanic;
        let mut b = [0u8];
        p.read(0, &mut b);
        assert_eq!(b[0], PVPANIC_CAPABILITIES);
        assert_eq!(p.write(0, &[1]), Some(GuestEvent::Panic));
        assert_eq!(p.write(0, &[2]), None);
        let mut e = ExitPort;
        assert_eq!(e.write(0, &[7]), Some(GuestEvent::ExitStatus(7)));
        assert_eq!(e.write(0, &[7, 0]), None);
    }
}
