//! Memory a task reaches through raw pointers: a device's register page mapped into
//! its space, and windows of memory mapped into it by map items (guest RAM, a DMA
//! buffer). The one place in `mkrt` that dereferences addresses.
//!
//! Design rules: every access is volatile (the other side — a device, the guest, the
//! vmm — changes the memory behind the compiler's back) and bounds-checked against the
//! window; a guest-provided address is an allegation checked here before any access.

use core::ptr;

use devices::virtio::{GuestMemory, MemError};

/// A device's 4 KiB register page. A copy refers to the same page (a driver and its
/// interrupt handler both need it).
#[derive(Clone, Copy)]
pub struct Regs {
    base: u64,
}

impl Regs {
    /// # Safety
    /// A device register page must be mapped readable and writable at `base` for as
    /// long as the value lives.
    pub const unsafe fn at(base: u64) -> Self {
        Self { base }
    }

    fn addr(&self, offset: u64) -> *mut u32 {
        assert!(offset < 4096 && offset.is_multiple_of(4), "register offset {offset:#x}");
        (self.base + offset) as *mut u32
    }

    pub fn read32(&self, offset: u64) -> u32 {
        // SAFETY: inside the mapped register page (`at`), aligned (`addr` checks).
        unsafe { ptr::read_volatile(self.addr(offset)) }
    }

    pub fn write32(&self, offset: u64, value: u32) {
        // SAFETY: as in `read32`.
        unsafe { ptr::write_volatile(self.addr(offset), value) }
    }
}

/// `len` bytes of memory mapped at `base` in this task, addressed from `origin` (the
/// address the other side uses for the first byte: 0 for guest RAM, the physical
/// address for a DMA buffer).
pub struct Window {
    base: u64,
    len: u64,
    origin: u64,
}

impl Window {
    /// # Safety
    /// `[base, base + len)` must be mapped read-write in this task for as long as the
    /// value lives, and no Rust reference may point into it.
    pub const unsafe fn new(base: u64, len: u64, origin: u64) -> Self {
        Self { base, len, origin }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn origin(&self) -> u64 {
        self.origin
    }

    /// The local address of `[addr, addr + len)`, if all of it is in the window.
    fn at(&self, addr: u64, len: usize) -> Result<u64, MemError> {
        let err = MemError { addr, len: len as u64 };
        let off = addr.checked_sub(self.origin).ok_or(err)?;
        let end = off.checked_add(len as u64).ok_or(err)?;
        if end > self.len {
            return Err(err);
        }
        Ok(self.base + off)
    }
}

impl GuestMemory for Window {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let src = self.at(addr, buf.len())? as *const u8;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `at` checked the whole range is inside the mapped window.
            *b = unsafe { ptr::read_volatile(src.add(i)) };
        }
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        let dst = self.at(addr, buf.len())? as *mut u8;
        for (i, &b) in buf.iter().enumerate() {
            // SAFETY: as in `read`.
            unsafe { ptr::write_volatile(dst.add(i), b) };
        }
        Ok(())
    }

    fn check_range(&self, addr: u64, len: u64) -> bool {
        usize::try_from(len).is_ok_and(|l| self.at(addr, l).is_ok())
    }

    fn load_u16(&self, addr: u64) -> Result<u16, MemError> {
        let p = self.at(addr, 2)?;
        if !p.is_multiple_of(2) {
            return Err(MemError { addr, len: 2 });
        }
        // SAFETY: inside the window (`at`) and aligned: one 16-bit load.
        Ok(unsafe { ptr::read_volatile(p as *const u16) })
    }

    fn store_u16(&self, addr: u64, value: u16) -> Result<(), MemError> {
        let p = self.at(addr, 2)?;
        if !p.is_multiple_of(2) {
            return Err(MemError { addr, len: 2 });
        }
        // SAFETY: as in `load_u16`.
        unsafe { ptr::write_volatile(p as *mut u16, value) };
        Ok(())
    }
}
