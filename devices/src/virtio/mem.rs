//! Guest memory as a device sees it: an address space it may read and write through
//! bounds-checked copies, never through pointers.
//!
//! Every guest physical address a device uses is an allegation made by the guest
//! (descriptor addresses, ring addresses). `GuestMemory` implementations check the
//! whole range `[addr, addr + len)` and refuse it as a unit if any byte lies outside
//! the RAM the device was given; nothing is read or written in that case.

/// The guest named memory that the device does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest address range {addr:#x}+{len:#x} is not in guest RAM")]
pub struct MemError {
    pub addr: u64,
    pub len: u64,
}

/// Guest RAM, as seen by a device.
///
/// `read`/`write` copy whole ranges or nothing. The `load_u16`/`store_u16` pair is used
/// for ring indices, which the driver updates concurrently: implementations must make
/// them single aligned accesses (the defaults go through `read`/`write`, which is enough
/// for memory no one else touches, like a test's `Vec`).
pub trait GuestMemory {
    /// Copy `buf.len()` bytes from guest address `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Copy `buf` to guest address `addr`.
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError>;

    /// Whether `[addr, addr + len)` lies entirely in guest RAM.
    fn check_range(&self, addr: u64, len: u64) -> bool;

    fn load_u16(&self, addr: u64) -> Result<u16, MemError> {
        let mut b = [0; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn store_u16(&self, addr: u64, value: u16) -> Result<(), MemError> {
        self.write(addr, &value.to_le_bytes())
    }

    fn read_u32(&self, addr: u64) -> Result<u32, MemError> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Guest RAM backed by a plain byte vector starting at guest address `base`: for tests,
/// fuzzing, and anything that wants a private copy.
#[derive(Debug, Clone)]
pub struct VecMemory {
    base: u64,
    bytes: core::cell::RefCell<alloc::vec::Vec<u8>>,
}

impl VecMemory {
    pub fn new(base: u64, len: usize) -> Self {
        VecMemory {
            base,
            bytes: core::cell::RefCell::new(alloc::vec![0; len]),
        }
    }

    fn range(&self, addr: u64, len: usize) -> Result<core::ops::Range<usize>, MemError> {
        let err = MemError {
            addr,
            len: len as u64,
        };
        let start = addr.checked_sub(self.base).ok_or(err)?;
        let end = start.checked_add(len as u64).ok_or(err)?;
        if end > self.bytes.borrow().len() as u64 {
            return Err(err);
        }
        Ok(start as usize..end as usize)
    }
}

impl GuestMemory for VecMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes.borrow()[r]);
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        let r = self.range(addr, buf.len())?;
        self.bytes.borrow_mut()[r].copy_from_slice(buf);
        Ok(())
    }

    fn check_range(&self, addr: u64, len: u64) -> bool {
        usize::try_from(len).is_ok_and(|len| self.range(addr, len).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_all_or_nothing() {
        let m = VecMemory::new(0x1000, 0x100);
        m.write(0x10f0, &[1; 16]).unwrap();
        assert!(m.write(0x10f8, &[2; 16]).is_err());
        let mut b = [0; 16];
        m.read(0x10f0, &mut b).unwrap();
        assert_eq!(b, [1; 16], "the refused write changed nothing");
        assert!(m.read(0xff8, &mut b).is_err());
        assert!(m.read(u64::MAX - 4, &mut b).is_err());
        assert!(!m.check_range(0x1000, 0x101));
        assert!(m.check_range(0x1000, 0x100));
        assert!(!m.check_range(u64::MAX, u64::MAX));
    }
}
