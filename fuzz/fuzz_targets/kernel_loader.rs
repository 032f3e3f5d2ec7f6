//! The kernel-image path of `vmm/src/boot.rs`, on an in-memory image: the quick checks
//! `vmm` runs before it opens KVM (`check_kernel_image`, as `check_kernel_file` does),
//! then `load_kernel_image` (as `load_kernel` does: format detection, the bzImage setup
//! header, linux-loader's bzImage/ELF loaders, the size checks) into a small guest, then
//! the zero page built from what the image's header said (`write_boot_params`).
//! The input is the image itself. Never panics.

#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::boot::{self, BootError, KernelFormat};

/// Guest RAM: big enough for the zero page, the command line and a small kernel at 1 MiB.
const MEM: u64 = 8 << 20;

thread_local! {
    static GUEST: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
}

fuzz_target!(|image: &[u8]| {
    let path = Path::new("fuzz-kernel");
    let len = image.len() as u64;
    let checked = boot::check_kernel_image(&mut Cursor::new(image), len, path);
    GUEST.with(|mem| {
        let loaded = boot::load_kernel_image(mem, MEM, &mut Cursor::new(image), len, path);
        match (&checked, &loaded) {
            // What is no kernel to the quick check is none to the loader either.
            (Err(BootError::NotAKernel(_)), l) => {
                assert!(
                    matches!(l, Err(BootError::NotAKernel(_))),
                    "check and load disagree"
                );
            }
            (Ok(KernelFormat::Elf), Err(BootError::Not64Bit(_))) => panic!("an ELF is no bzImage"),
            _ => {}
        }
        if let Ok(k) = loaded {
            let mut cmdline = Cmdline::new(2048).unwrap();
            cmdline.insert_str("console=ttyS0 panic=-1").unwrap();
            boot::write_boot_params(mem, MEM, &k, None, &cmdline, GuestAddress(0xe0000)).unwrap();
        }
    });
});
