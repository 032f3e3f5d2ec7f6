//! The local APIC (the periodic timer that drives the core's ticks, end of interrupt)
//! and the IOAPIC (lines 0..24 as vectors 33..57: tasks' lines masked until a handler
//! unmasks them, the vmm's two — dump request and guest exit — unmasked from boot).
//!
//! Both are MMIO in the APIC window `paging` maps. The legacy PIC is never programmed:
//! LINT0 is masked so it cannot deliver anything.

use core::ptr;

use super::trap::{IRQ_LINES, IRQ_VECTOR_BASE, TIMER_VECTOR};

pub const LAPIC_BASE: u64 = 0xfee0_0000;
pub const IOAPIC_BASE: u64 = 0xfec0_0000;

const SVR: u64 = 0xf0;
const EOI: u64 = 0xb0;
const LVT_TIMER: u64 = 0x320;
const LVT_LINT0: u64 = 0x350;
const TIMER_DIVIDE: u64 = 0x3e0;
const TIMER_INITIAL: u64 = 0x380;
const MASKED: u32 = 1 << 16;
const PERIODIC: u32 = 1 << 17;

/// LAPIC timer counts per tick. KVM's APIC bus runs at 1 GHz: 10 ms.
pub const TICK_COUNT: u32 = 10_000_000;
pub const TICK_MS: u64 = 10;

fn lapic_write(reg: u64, v: u32) {
    // SAFETY: LAPIC registers in the uncached APIC window mapped by `paging`.
    unsafe { ptr::write_volatile((LAPIC_BASE + reg) as *mut u32, v) }
}

fn ioapic_write(reg: u32, v: u32) {
    // SAFETY: the IOAPIC's index and data registers in the APIC window.
    unsafe {
        ptr::write_volatile(IOAPIC_BASE as *mut u32, reg);
        ptr::write_volatile((IOAPIC_BASE + 0x10) as *mut u32, v);
    }
}

pub fn init() {
    lapic_write(SVR, 0x1ff); // enabled, spurious vector 0xff
    lapic_write(LVT_LINT0, MASKED);
    lapic_write(TIMER_DIVIDE, 0xb); // divide by 1
    lapic_write(LVT_TIMER, TIMER_VECTOR as u32 | PERIODIC);
    lapic_write(TIMER_INITIAL, TICK_COUNT);
    for line in 0..IRQ_LINES {
        ioapic_write(0x11 + 2 * line as u32, 0); // destination APIC 0
        ioapic_set(line, true);
    }
    ioapic_set(microkernel::bootinfo::hyper::EXIT_LINE, false);
    ioapic_set(microkernel::bootinfo::hyper::DUMP_LINE, false);
}

/// Mask or unmask IOAPIC `line` (edge triggered, fixed delivery to APIC 0).
pub fn ioapic_set(line: u16, masked: bool) {
    if line < IRQ_LINES {
        let v = (IRQ_VECTOR_BASE as u32 + line as u32) | if masked { MASKED } else { 0 };
        ioapic_write(0x10 + 2 * line as u32, v);
    }
}

pub fn eoi() {
    lapic_write(EOI, 0);
}
