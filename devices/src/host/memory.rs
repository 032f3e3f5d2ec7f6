//! `GuestMemory` over vm-memory's mmap-backed guest RAM.
//!
//! vm-memory checks every access against the guest's regions (an address outside all
//! of them, including the MMIO gap, is an error), and its `load`/`store` are single
//! aligned atomic accesses, as the ring indices need.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::virtio::{GuestMemory, MemError};

/// The guest's RAM as the vmm mapped it.
#[derive(Clone, Debug)]
pub struct HostMemory(pub GuestMemoryMmap);

fn err(addr: u64, len: usize) -> MemError {
    MemError {
        addr,
        len: len as u64,
    }
}

impl GuestMemory for HostMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        if !self.check_range(addr, buf.len() as u64) {
            return Err(err(addr, buf.len()));
        }
        self.0
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| err(addr, buf.len()))
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        if !self.check_range(addr, buf.len() as u64) {
            return Err(err(addr, buf.len()));
        }
        self.0
            .write_slice(buf, GuestAddress(addr))
            .map_err(|_| err(addr, buf.len()))
    }

    fn check_range(&self, addr: u64, len: u64) -> bool {
        match usize::try_from(len) {
            Ok(0) => self.0.address_in_range(GuestAddress(addr)),
            Ok(len) => {
                addr.checked_add(len as u64).is_some()
                    && self.0.check_range(GuestAddress(addr), len)
            }
            Err(_) => false,
        }
    }

    fn load_u16(&self, addr: u64) -> Result<u16, MemError> {
        if !addr.is_multiple_of(2) {
            return Err(err(addr, 2));
        }
        self.0
            .load(GuestAddress(addr), Ordering::Acquire)
            .map_err(|_| err(addr, 2))
    }

    fn store_u16(&self, addr: u64, value: u16) -> Result<(), MemError> {
        if !addr.is_multiple_of(2) {
            return Err(err(addr, 2));
        }
        self.0
            .store(value, GuestAddress(addr), Ordering::Release)
            .map_err(|_| err(addr, 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_outside_the_regions_fail_whole() {
        let gm = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x10000), 0x1000),
        ])
        .unwrap();
        let m = HostMemory(gm);
        m.write(0x1ff0, &[1; 16]).unwrap();
        assert!(m.write(0x1ff8, &[1; 16]).is_err(), "runs into the hole");
        assert!(m.read(0x8000, &mut [0; 1]).is_err());
        assert!(m.read(u64::MAX, &mut [0; 2]).is_err());
        m.store_u16(0x10000, 0xabcd).unwrap();
        assert_eq!(m.load_u16(0x10000).unwrap(), 0xabcd);
        assert!(m.load_u16(0x11000).is_err());
        assert!(!m.check_range(0x1000, 0x10000));
    }
}
