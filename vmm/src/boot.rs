//! Loading Linux: the kernel image (bzImage or ELF vmlinux), the initrd, the command
//! line and the zero page (`boot_params`, with the e820 map), following the x86 64-bit
//! boot protocol (Documentation/arch/x86/boot.rst).
//!
//! Everything read from the kernel file is untrusted: sizes are checked against guest
//! memory before anything is copied, and a file that is no kernel is a clear error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header, XLF_KERNEL_64};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

/// What can go wrong while loading the guest's kernel and initrd.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} '{path}': {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("'{0}' is not a Linux kernel: expected a bzImage (\"HdrS\" header) or an ELF vmlinux")]
    NotAKernel(PathBuf),
    #[error(
        "'{0}' is a bzImage without a 64-bit entry point (XLF_KERNEL_64); only x86_64 kernels boot"
    )]
    Not64Bit(PathBuf),
    #[error("kernel '{path}' is truncated: {actual} bytes, but its header says {expected}")]
    Truncated {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("cannot load kernel '{path}' (truncated or corrupt image?): {source}")]
    Load {
        path: PathBuf,
        source: loader::Error,
    },
    #[error("kernel '{path}' needs {need} MiB from {load:#x} but the guest has only {have} MiB of low memory; raise --memory")]
    KernelTooBig {
        path: PathBuf,
        need: u64,
        load: u64,
        have: u64,
    },
    #[error("initrd '{path}' ({size} MiB) does not fit in guest memory after the kernel ({free} MiB free below {limit:#x}); raise --memory")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        free: u64,
        limit: u64,
    },
    #[error("reading initrd '{path}': {source}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("writing boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The kind of kernel image, from its magic numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

/// Where the loaded kernel starts executing and what the zero page needs from it.
pub struct LoadedKernel {
    pub entry: GuestAddress,
    header: Option<setup_header>,
    end: u64,
}

/// Identify a kernel image by its magic numbers without loading it.
pub fn detect_format<R: Read + Seek>(file: &mut R) -> std::io::Result<Option<KernelFormat>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = read_up_to(file, &mut head)?;
    file.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[0..4] == *b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    if n >= 0x206 && u32::from_le_bytes(head[0x202..0x206].try_into().unwrap()) == KERNEL_HDR_MAGIC
    {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// Open and identify a kernel image, and check a bzImage is as long as its header
/// says: the quick checks that need no KVM, so a bad path or file is reported first.
pub fn check_kernel_file(path: &Path) -> Result<KernelFormat, BootError> {
    let mut file = open("kernel image", path)?;
    let len = file
        .metadata()
        .map_err(|source| BootError::Open {
            what: "kernel image",
            path: path.into(),
            source,
        })?
        .len();
    check_kernel_image(&mut file, len, path)
}

/// `check_kernel_file` on an image already open (`len` bytes long; `path` names it in
/// errors).
pub fn check_kernel_image<R: Read + Seek>(
    file: &mut R,
    len: u64,
    path: &Path,
) -> Result<KernelFormat, BootError> {
    let io_err = |source| BootError::Open {
        what: "kernel image",
        path: path.into(),
        source,
    };
    let format = detect_format(file)
        .map_err(io_err)?
        .ok_or_else(|| BootError::NotAKernel(path.into()))?;
    if format == KernelFormat::BzImage {
        let hdr = read_setup_header(file).map_err(|source| BootError::Load {
            path: path.into(),
            source,
        })?;
        let setup_sects = if hdr.setup_sects == 0 {
            4
        } else {
            u64::from(hdr.setup_sects)
        };
        let expected = (setup_sects + 1) * 512 + u64::from(hdr.syssize) * 16;
        if len < expected {
            return Err(BootError::Truncated {
                path: path.into(),
                actual: len,
                expected,
            });
        }
    }
    Ok(format)
}

fn read_up_to<R: Read>(file: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        what,
        path: path.into(),
        source,
    })
}

/// End of the RAM that lies below the MMIO gap.
fn low_mem_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// Load the kernel at `path` into guest memory.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let mut file = open("kernel image", path)?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    load_kernel_image(mem, mem_size, &mut file, file_len, path)
}

/// `load_kernel` from an image already open (`file_len` bytes long; `path` names it in
/// errors).
pub fn load_kernel_image<R: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    file: &mut R,
    file_len: u64,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let format = detect_format(file)
        .map_err(|source| BootError::Open {
            what: "kernel image",
            path: path.into(),
            source,
        })?
        .ok_or_else(|| BootError::NotAKernel(path.into()))?;
    let low_end = low_mem_end(mem_size);
    let too_big = |need: u64, load: u64| BootError::KernelTooBig {
        path: path.into(),
        need: need.div_ceil(1 << 20),
        load,
        have: low_end >> 20,
    };
    let load_err = |source| BootError::Load {
        path: path.into(),
        source,
    };

    match format {
        KernelFormat::BzImage => {
            let hdr = read_setup_header(file).map_err(load_err)?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::Not64Bit(path.into()));
            }
            // The kernel decompresses in place and needs init_size bytes from its load address.
            let load = HIMEM_START;
            let init_size = u64::from(hdr.init_size);
            if load + init_size > low_end {
                return Err(too_big(init_size, load));
            }
            if load + file_len > low_end {
                return Err(too_big(file_len, load));
            }
            let r = linux_loader::loader::bzimage::BzImage::load(
                mem,
                Some(GuestAddress(load)),
                file,
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(load_err)?;
            let header = r.setup_header.unwrap_or(hdr);
            Ok(LoadedKernel {
                entry: r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                end: r.kernel_end.max(load + init_size),
                header: Some(header),
            })
        }
        KernelFormat::Elf => {
            let r = linux_loader::loader::elf::Elf::load(
                mem,
                None,
                file,
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(load_err)?;
            if r.kernel_end > low_end {
                return Err(too_big(r.kernel_end - HIMEM_START, HIMEM_START));
            }
            Ok(LoadedKernel {
                entry: r.kernel_load,
                end: r.kernel_end,
                header: None,
            })
        }
    }
}

/// Read the bzImage setup header at 0x1f1, checking only what loading needs.
fn read_setup_header<R: Read + Seek>(file: &mut R) -> Result<setup_header, loader::Error> {
    let mut hdr = setup_header::default();
    file.seek(SeekFrom::Start(0x1f1))
        .map_err(|_| loader::Error::Bzimage(loader::bzimage::Error::SeekBzImageHeader))?;
    let bytes = hdr.as_mut_slice();
    file.read_exact(bytes)
        .map_err(|_| loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageHeader))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|_| loader::Error::Bzimage(loader::bzimage::Error::SeekBzImageHeader))?;
    Ok(hdr)
}

/// Where an initrd went.
pub struct LoadedInitrd {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Place the initrd at the top of low memory, page aligned, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<LoadedInitrd, BootError> {
    let mut file = open("initrd", path)?;
    let size = file
        .metadata()
        .map_err(|source| BootError::ReadInitrd {
            path: path.into(),
            source,
        })?
        .len();
    // The kernel may not be able to reach an initrd above initrd_addr_max.
    let max = kernel
        .header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(0x37ff_ffff);
    let limit = low_mem_end(mem_size).min(max.saturating_add(1));
    let lowest = kernel.end.next_multiple_of(PAGE_SIZE);
    let free = limit.saturating_sub(lowest);
    if size > free {
        return Err(BootError::InitrdTooBig {
            path: path.into(),
            size: size.div_ceil(1 << 20),
            free: free >> 20,
            limit,
        });
    }
    let addr = (limit - size) & !(PAGE_SIZE - 1);
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::ReadInitrd {
            path: path.into(),
            source: std::io::Error::other(e),
        })?;
    Ok(LoadedInitrd {
        addr: GuestAddress(addr),
        size,
    })
}

/// Write the command line and the zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    initrd: Option<&LoadedInitrd>,
    cmdline: &Cmdline,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(|_| {
        BootError::Memory(vm_memory::GuestMemoryError::InvalidGuestAddress(
            GuestAddress(CMDLINE_START),
        ))
    })?;
    let cmdline_len = cmdline.as_cstring()?.as_bytes().len();

    let mut params = boot_params {
        hdr: kernel.header.unwrap_or_default(),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if kernel.header.is_none() {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.raw_value();

    let map = e820_map(mem_size);
    for (i, &(addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

/// The e820 memory map: (address, size, type).
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (ACPI_START, ACPI_END - ACPI_START, E820_RESERVED),
    ];
    for (start, size) in ram_regions(mem_size) {
        // The first region begins at 0; its usable part starts at 1 MiB.
        let (start, size) = if start == 0 {
            (HIMEM_START, size - HIMEM_START)
        } else {
            (start, size)
        };
        map.push((start, size, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_skips_the_gap() {
        let m = e820_map(512 << 20);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[2], (HIMEM_START, (512 << 20) - HIMEM_START, E820_RAM));
        let m = e820_map(4 << 30);
        assert_eq!(
            m.last().unwrap(),
            &(MMIO_GAP_END, (4 << 30) - MMIO_GAP_START, E820_RAM)
        );
        let ram: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (4 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn detect_format_rejects_garbage_and_short_files() {
        let dir = std::env::temp_dir().join(format!("vmm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let check = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            detect_format(&mut File::open(&p).unwrap()).unwrap()
        };
        assert_eq!(check("empty", b""), None);
        assert_eq!(check("text", b"#!/bin/sh\necho not a kernel\n"), None);
        assert_eq!(
            check("elf", b"\x7fELF\x02\x01\x01"),
            Some(KernelFormat::Elf)
        );
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(check("bz", &bz), Some(KernelFormat::BzImage));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
