//! The guest physical memory layout of an x86_64 guest, in one place.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (RAM, untouched)
//! 0x0000_0500  GDT                     (BOOT_GDT_START)
//! 0x0000_0520  IDT (empty)             (BOOT_IDT_START)
//! 0x0000_7000  zero page / boot_params (ZERO_PAGE_START)
//! 0x0000_8000  initial kernel stack top(BOOT_STACK_POINTER)
//! 0x0000_9000  PML4, PDPTE, PDE        (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line     (CMDLINE_START, up to CMDLINE_MAX_SIZE)
//! 0x0009_fc00  EBDA start: RAM below this is usable, the rest of low memory is not
//! 0x000e_0000  ACPI tables: RSDP, XSDT, FADT, MADT, DSDT (ACPI_START, reserved)
//! 0x0010_0000  kernel load address (HIMEM_START); initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO gap (MMIO_GAP_START .. 4 GiB): virtio-mmio devices,
//!              IOAPIC (0xfec0_0000), LAPIC (0xfee0_0000)
//! 0x1_0000_0000  RAM above 4 GiB when the guest has more than MMIO_GAP_START bytes
//! ```
//!
//! I/O ports used by the platform devices:
//!
//! | port        | device                                                   |
//! |-------------|----------------------------------------------------------|
//! | 0x3f8-0x3ff | COM1 16550 UART, IRQ 4: the console                      |
//! | 0x0064      | i8042 command port: only the 0xfe "pulse reset" command  |
//! | 0x0501      | exit-status port: the guest writes the vmm's exit status |
//! | 0x0505      | pvpanic: bit 0 set = guest kernel panicked               |
//! | 0x0600      | ACPI sleep control/status and reset register             |
//!
//! VM0 (`vmm --microkernel`, see `mk`) has no UART model, ACPI or PIT; its ports:
//!
//! | port        | VM0 device                                               |
//! |-------------|----------------------------------------------------------|
//! | 0x3f8       | console: bytes written to COM1's THR go to stdout        |
//! | 0x0510      | exit: the vmm exits at once with the byte written        |
//! | 0x0511      | raise IRQ: pulse IOAPIC pin n (the byte written), edge   |
//! | 0x0512      | step count: n != 0 starts counting instructions by CPL   |
//! |             | (single-step) for n round trips, 0 stops and prints      |
//! | 0x0513      | hypercall (kernel only): guest VMs, `microkernel::bootinfo::hyper` |
//!
//! The kernel opens 0x510..=0x512 to user mode (TSS I/O bitmap).

/// Start of the GDT the vCPU starts with.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) IDT the vCPU starts with.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux boot protocol "zero page".
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level 4 page table of the identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the identity map (2 MiB pages covering 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line size including the terminating NUL (Linux's x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: usable low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the legacy BIOS area, which is not reported as RAM.
pub const ACPI_START: u64 = 0xe0000;
/// End of the legacy BIOS area.
pub const ACPI_END: u64 = 0x100000;
/// Where high memory starts and the kernel is loaded.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO gap; RAM beyond this moves above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window (each device gets `VIRTIO_MMIO_SIZE` bytes).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) below the IOAPIC, needed on Intel hosts.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// COM1 base port and IRQ.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line (ISA IRQ 4, routed 1:1 to an IOAPIC pin).
pub const COM1_IRQ: u32 = 4;
/// i8042 command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;
/// The guest writes one byte here: the status the vmm exits with at power-off.
pub const EXIT_PORT: u16 = 0x501;
/// QEMU-compatible pvpanic ISA port.
pub const PVPANIC_PORT: u16 = 0x505;
/// ACPI hardware-reduced sleep control/status and reset register.
pub const ACPI_PM_PORT: u16 = 0x600;
/// VM0: exit now with the status written.
pub const MK_EXIT_PORT: u16 = 0x510;
/// VM0: pulse the IOAPIC pin written (interrupt source for interrupts-as-IPC tests).
pub const MK_RAISE_IRQ_PORT: u16 = 0x511;
/// VM0: start (n round trips follow) or stop (0) counting instructions by single-step.
pub const MK_STEP_PORT: u16 = 0x512;
/// First interrupt line for virtio-mmio devices (lines 5.. avoid the ISA devices).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC pins (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u32 = 24;
/// Virtio-mmio devices we can give a guest: one IOAPIC pin each, from `VIRTIO_IRQ_BASE`.
pub const MAX_VIRTIO_DEVICES: usize = (IOAPIC_PINS - VIRTIO_IRQ_BASE) as usize;
/// `QueueNotify` register offset in a virtio-mmio window (where the ioeventfds sit).
pub const VIRTIO_MMIO_NOTIFY_OFFSET: u64 = 0x50;

/// Guest physical base of virtio-mmio device `index`.
pub const fn virtio_mmio_base(index: usize) -> u64 {
    VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE
}

/// Smallest guest RAM we accept: enough for the boot structures, a small kernel and initrd.
pub const MIN_MEMORY: u64 = 32 << 20;

// The layout's fixed relations, checked at compile time.
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
const _: () = assert!(VIRTIO_MMIO_START >= MMIO_GAP_START && IOAPIC_START < MMIO_GAP_END);
// hosted mode: VM0's device tasks find the devices where native mode puts them
const _: () = assert!(VIRTIO_MMIO_START == microkernel::bootinfo::layout::DEVICE_PHYS);
const _: () = assert!(VIRTIO_IRQ_BASE == microkernel::bootinfo::layout::DEVICE_IRQ_BASE as u32);
const _: () = assert!(virtio_mmio_base(MAX_VIRTIO_DEVICES) <= IOAPIC_START);

/// The guest RAM regions for `mem_size` bytes: below the MMIO gap, and the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
    }

    #[test]
    fn ram_regions_skip_the_mmio_gap() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        let r = ram_regions(4 << 30);
        assert_eq!(
            r,
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
