//! Loading VM0: the kernel ELF where it is linked (physical = virtual), the root
//! task's image right after it, and the boot information at `ZERO_PAGE_START` (the
//! vCPU starts with `rsi` pointing there, see `regs::setup_boot_cpu`).

use microkernel::bootinfo::{BootInfo, Region, MAX_REGIONS};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::ZERO_PAGE_START;
use crate::VmmError;

const PAGE: u64 = 4096;

/// A loadable segment of an ELF64 executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    pub vaddr: u64,
    pub data: &'a [u8],
    pub memsz: u64,
    /// `PF_X` 1, `PF_W` 2, `PF_R` 4: the same bits as `abi::Rights`.
    pub flags: u32,
}

fn bad(what: &str) -> VmmError {
    VmmError::Config(format!("embedded microkernel image: {what}"))
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// The entry point and PT_LOAD segments of a little-endian x86_64 ELF64 executable.
pub fn parse_elf(elf: &[u8]) -> Result<(u64, Vec<Segment<'_>>), VmmError> {
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || u16_at(elf, 18) != Some(62) {
        return Err(bad("not an x86_64 ELF64 file"));
    }
    let short = || bad("truncated");
    let entry = u64_at(elf, 24).ok_or_else(short)?;
    let phoff = u64_at(elf, 32).ok_or_else(short)? as usize;
    let phentsize = u16_at(elf, 54).ok_or_else(short)? as usize;
    let phnum = u16_at(elf, 56).ok_or_else(short)? as usize;
    let mut segs = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(elf, ph).ok_or_else(short)? != 1 {
            continue; // not PT_LOAD
        }
        let flags = u32_at(elf, ph + 4).ok_or_else(short)?;
        let offset = u64_at(elf, ph + 8).ok_or_else(short)? as usize;
        let vaddr = u64_at(elf, ph + 16).ok_or_else(short)?;
        let filesz = u64_at(elf, ph + 32).ok_or_else(short)? as usize;
        let memsz = u64_at(elf, ph + 40).ok_or_else(short)?;
        let data = elf.get(offset..offset + filesz).ok_or_else(short)?;
        if memsz < filesz as u64 {
            return Err(bad("segment smaller in memory than in the file"));
        }
        segs.push(Segment {
            vaddr,
            data,
            memsz,
            flags: flags & 7,
        });
    }
    if segs.is_empty() {
        return Err(bad("no loadable segments"));
    }
    Ok((entry, segs))
}

fn span(segs: &[Segment]) -> (u64, u64) {
    let lo = segs.iter().map(|s| s.vaddr).min().unwrap_or(0) & !(PAGE - 1);
    let hi = segs
        .iter()
        .map(|s| s.vaddr + s.memsz)
        .max()
        .unwrap_or(0)
        .next_multiple_of(PAGE);
    (lo, hi)
}

/// The root image's pages as regions of equal rights (a page shared by two segments
/// gets both segments' rights).
pub fn regions(segs: &[Segment], phys: u64) -> Result<Vec<Region>, VmmError> {
    let (lo, hi) = span(segs);
    let mut rights = vec![0u64; ((hi - lo) / PAGE) as usize];
    for s in segs {
        let first = (s.vaddr & !(PAGE - 1)) - lo;
        let end = (s.vaddr + s.memsz).next_multiple_of(PAGE) - lo;
        for p in (first..end).step_by(PAGE as usize) {
            rights[(p / PAGE) as usize] |= u64::from(s.flags);
        }
    }
    let mut out: Vec<Region> = Vec::new();
    for (i, &r) in rights.iter().enumerate() {
        let va = lo + i as u64 * PAGE;
        match out.last_mut() {
            Some(last) if last.rights == r && last.vaddr + last.size == va => last.size += PAGE,
            _ => out.push(Region {
                vaddr: va,
                paddr: phys + (va - lo),
                size: PAGE,
                rights: r,
            }),
        }
    }
    if out.len() > MAX_REGIONS {
        return Err(bad("root image has too many differently protected parts"));
    }
    Ok(out)
}

/// Load the kernel and the root image; returns the kernel's entry point.
/// `devices`: VM0's virtio-mmio windows (hosted mode), mapped into the root task at
/// `layout::DEVICES`.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    mode: u64,
    flags: u64,
    devices: u64,
) -> Result<u64, VmmError> {
    let (kentry, ksegs) = parse_elf(super::KERNEL_ELF)?;
    for s in &ksegs {
        mem.write_slice(s.data, GuestAddress(s.vaddr))
            .map_err(VmmError::Memory)?;
    }
    let (_, kernel_end) = span(&ksegs);
    let (rentry, rsegs) = parse_elf(super::ROOT_ELF)?;
    let (lo, hi) = span(&rsegs);
    let phys = kernel_end;
    for s in &rsegs {
        mem.write_slice(s.data, GuestAddress(phys + (s.vaddr - lo)))
            .map_err(VmmError::Memory)?;
    }
    let mut regions = regions(&rsegs, phys)?;
    if devices > 0 {
        if regions.len() == MAX_REGIONS {
            return Err(bad("no boot region left for VM0's devices"));
        }
        // the devices' windows, then (after room for the most devices) their doorbells
        let most = microkernel::bootinfo::layout::MAX_DEVICES;
        regions.push(Region {
            vaddr: microkernel::bootinfo::layout::DEVICES,
            paddr: crate::layout::VIRTIO_MMIO_START,
            size: (most + devices) * crate::layout::VIRTIO_MMIO_SIZE,
            rights: microkernel::abi::Rights::RW.bits() as u64,
        });
    }
    let mut info = BootInfo {
        free_start: phys + (hi - lo),
        free_end: mem_size,
        mode,
        flags,
        root_entry: rentry,
        nregions: regions.len() as u64,
        ..Default::default()
    };
    info.regions[..regions.len()].copy_from_slice(&regions);
    if info.free_start + (8 << 20) > info.free_end {
        return Err(bad("VM0 memory too small"));
    }
    for (i, w) in info.to_words().iter().enumerate() {
        mem.write_obj(*w, GuestAddress(ZERO_PAGE_START + 8 * i as u64))
            .map_err(VmmError::Memory)?;
    }
    Ok(kentry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_images_parse() {
        let (entry, segs) = parse_elf(crate::mk::KERNEL_ELF).unwrap();
        assert!(segs
            .iter()
            .any(|s| (s.vaddr..s.vaddr + s.memsz).contains(&entry)));
        let (_, rsegs) = parse_elf(crate::mk::ROOT_ELF).unwrap();
        let regions = regions(&rsegs, 0x100_0000).unwrap();
        assert!(
            regions.iter().any(|r| r.rights & 1 != 0),
            "no executable part"
        );
        assert!(parse_elf(b"not an elf").is_err());
    }

    #[test]
    fn shared_pages_get_both_rights() {
        let text = [0u8; 0x10];
        let segs = [
            Segment {
                vaddr: 0x4000_0000,
                data: &text,
                memsz: 0x10,
                flags: 4,
            },
            Segment {
                vaddr: 0x4000_0020,
                data: &text,
                memsz: 0x1000,
                flags: 5,
            },
            Segment {
                vaddr: 0x4000_2000,
                data: &text,
                memsz: 0x3000,
                flags: 6,
            },
        ];
        let r = regions(&segs, 0x10_0000).unwrap();
        assert_eq!(
            r,
            vec![
                Region {
                    vaddr: 0x4000_0000,
                    paddr: 0x10_0000,
                    size: 0x2000,
                    rights: 5
                },
                Region {
                    vaddr: 0x4000_2000,
                    paddr: 0x10_2000,
                    size: 0x3000,
                    rights: 6
                },
            ]
        );
    }
}
