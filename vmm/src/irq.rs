//! Interrupt lines: an eventfd registered with KVM as an irqfd for one GSI, so a device
//! raises its interrupt with one write and no vmm-side interrupt controller.

use std::sync::Arc;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An edge on a GSI, through KVM's irqfd.
#[derive(Clone)]
pub struct IrqTrigger(pub Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
