//! ACPI tables for a hardware-reduced x86 platform: RSDP → XSDT → FADT (→ DSDT), MADT.
//!
//! The guest learns everything about the machine from these tables: its CPUs and the
//! IOAPIC (MADT), how to power off and reset (FADT sleep control and reset registers),
//! and its devices (DSDT: the COM1 UART, pvpanic, one `LNRO0005` node per virtio-mmio
//! device). Hardware-reduced means no PM timer, no SCI, no legacy fixed hardware, so
//! Linux does not probe for any.

use acpi_tables::aml;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::{GenericAddress, Sdt};
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, ACPI_END, ACPI_START};
use devices::platform::{ACPI_RESET_VALUE, S5_SLEEP_TYPE};

const OEM_ID: [u8; 6] = *b"L4VMM ";
const OEM_TABLE_ID: [u8; 8] = *b"L4VMM   ";
const OEM_REVISION: u32 = 1;

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

/// Errors building or placing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({0} bytes) do not fit in the BIOS area below 1 MiB")]
    TooLarge(u64),
    #[error("writing the ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Build the tables for `num_cpus` vCPUs and `virtio` devices, write them at
/// `ACPI_START`, and return the RSDP's guest address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    virtio: &[MmioDeviceInfo],
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = align8(rsdp_addr + Rsdp::len() as u64);
    let mut place = |len: usize| {
        let at = next;
        next = align8(at + len as u64);
        at
    };

    let dsdt = dsdt(virtio);
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(num_cpus);
    let madt_addr = place(madt.len());
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for table in [fadt_addr, madt_addr] {
        xsdt.append(table);
    }
    let xsdt_addr = place(xsdt.len());
    if next > ACPI_END {
        return Err(AcpiError::TooLarge(next - ACPI_START));
    }

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    let mut rsdp_bytes = Vec::new();
    rsdp.to_aml_bytes(&mut rsdp_bytes);
    mem.write_slice(&rsdp_bytes, GuestAddress(rsdp_addr))?;
    for (table, addr) in [
        (&dsdt, dsdt_addr),
        (&fadt, fadt_addr),
        (&madt, madt_addr),
        (&xsdt, xsdt_addr),
    ] {
        mem.write_slice(table.as_slice(), GuestAddress(addr))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// FADT, ACPI 6.5 layout (276 bytes), hardware-reduced.
fn fadt(dsdt_addr: u64) -> Sdt {
    const FLAG_RESET_REG_SUP: u32 = 1 << 10;
    const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;
    // IAPC_BOOT_ARCH: no VGA, no CMOS RTC; also no 8042 flag, so Linux does not probe one.
    const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
    const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

    let mut t = Sdt::new(*b"FACP", 276, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u16(109, IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT);
    t.write_u32(112, FLAG_HW_REDUCED_ACPI | FLAG_RESET_REG_SUP);
    t.write(
        116,
        GenericAddress::io_port_address::<u8>(layout::ACPI_PM_PORT),
    );
    t.write_u8(128, ACPI_RESET_VALUE);
    t.write_u8(131, 5); // FADT minor version: ACPI 6.5
    t.write_u64(140, dsdt_addr); // X_DSDT
    t.write(
        244,
        GenericAddress::io_port_address::<u8>(layout::ACPI_PM_PORT),
    ); // SLEEP_CONTROL_REG
    t.write(
        256,
        GenericAddress::io_port_address::<u8>(layout::ACPI_PM_PORT),
    ); // SLEEP_STATUS_REG
    t.write_bytes(268, b"L4VMMKVM"); // hypervisor vendor identity
    t.update_checksum();
    t
}

/// MADT: one enabled local APIC per vCPU (APIC id = vCPU index) and the IOAPIC.
fn madt(num_cpus: u8) -> Sdt {
    const TYPE_LOCAL_APIC: u8 = 0;
    const TYPE_IOAPIC: u8 = 1;
    const LOCAL_APIC_ENABLED: u32 = 1;

    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, layout::LAPIC_START as u32);
    for cpu in 0..num_cpus {
        t.append_slice(&[TYPE_LOCAL_APIC, 8, cpu, cpu]);
        t.append(LOCAL_APIC_ENABLED);
    }
    t.append_slice(&[TYPE_IOAPIC, 12, 0, 0]);
    t.append(layout::IOAPIC_START as u32);
    t.append(0u32); // GSI base
    t.update_checksum();
    t
}

/// DSDT: `\_S5` for power-off and the devices under `\_SB`.
///
/// The AML builders borrow their children, so each node is built and serialized in one
/// expression.
fn dsdt(virtio: &[MmioDeviceInfo]) -> Sdt {
    let mut devices = Vec::new();
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut devices);
    aml::Device::new(
        "PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(
                    layout::PVPANIC_PORT,
                    layout::PVPANIC_PORT,
                    1,
                    1,
                )]),
            ),
        ],
    )
    .to_aml_bytes(&mut devices);
    for (index, dev) in virtio.iter().enumerate() {
        // One node per virtio-mmio device, found by Linux's virtio_mmio driver.
        let name = format!("V{index:03X}");
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(index as u32)),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, dev.base as u32, dev.len as u32),
                        &aml::Interrupt::new(true, true, false, false, dev.gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut devices);
    }

    // Serialize into a Vec first: `Sdt` as an AML sink re-checksums on every byte.
    let mut body = Vec::new();
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut body);
    aml::Scope::new("\\_SB_".into(), vec![&RawAml(devices)]).to_aml_bytes(&mut body);
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&body);
    t
}

/// Already-encoded AML, so nodes built in a loop can sit in one `Scope`.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len = u32_at(&read(mem, addr, 8), 4) as usize;
        read(mem, addr, len)
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let virtio = [
            MmioDeviceInfo {
                base: 0xd000_0000,
                len: 0x1000,
                gsi: 5,
            },
            MmioDeviceInfo {
                base: 0xd000_1000,
                len: 0x1000,
                gsi: 6,
            },
        ];
        let rsdp = write_tables(&mem, 3, &virtio).unwrap();
        let r = read(&mem, rsdp.0, 36);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt = table(&mem, u64_at(&r, 24));
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let fadt = table(&mem, u64_at(&xsdt, 36));
        let madt = table(&mem, u64_at(&xsdt, 44));
        assert_eq!((&fadt[0..4], fadt.len()), (&b"FACP"[..], 276));
        assert!(checksum_ok(&fadt));
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "hardware-reduced");
        let dsdt = table(&mem, u64_at(&fadt, 140));
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let count = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(count(b"LNRO0005"), 2);
        assert_eq!(count(b"QEMU0001"), 1);
        assert_eq!(count(b"_S5_"), 1);
        assert_eq!(&madt[0..4], b"APIC");
        assert!(checksum_ok(&madt));
        // 44-byte header, 3 local APICs, 1 IOAPIC.
        assert_eq!(madt.len(), 44 + 3 * 8 + 12);
        assert_eq!(&madt[44..48], &[0, 8, 0, 0]);
        assert_eq!(&madt[60..64], &[0, 8, 2, 2]);
        assert_eq!(madt[68], 1);
    }

    #[test]
    fn too_many_devices_is_an_error_not_a_panic() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let many: Vec<_> = (0..4000)
            .map(|i| MmioDeviceInfo {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                gsi: 5,
            })
            .collect();
        assert!(matches!(
            write_tables(&mem, 1, &many),
            Err(AcpiError::TooLarge(_))
        ));
    }
}
