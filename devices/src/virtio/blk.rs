//! virtio-blk (virtio 1.x §5.2): one request queue; each request is a 16-byte header
//! (type, sector), data buffers, and a one-byte status the device writes last.
//!
//! Requests are checked before any I/O: the sector range must lie inside the disk, data
//! lengths must be whole sectors, writes and discards to a read-only disk fail with
//! `IOERR`, unknown types get `UNSUPP`. Data moves through one 64 KiB bounce buffer, so a
//! request with gigabyte-sized descriptors costs time, never memory. A request whose
//! buffers lie outside guest RAM gets `IOERR` (if its status byte is reachable).

use alloc::vec;
use alloc::vec::Vec;

use super::queue::{Chain, Descriptor, Reader};
use super::{device_type, read_config_bytes, DeviceError, GuestMemory, Queue, VirtioDevice};

pub const SECTOR_SIZE: u64 = 512;
const BOUNCE: usize = 64 * 1024;
const QUEUE_SIZE: u16 = 256;
/// Discard segments accepted per request (announced as `max_discard_seg`).
const MAX_DISCARD_SEG: u32 = 16;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = 20;

pub mod feature {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
}

mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
}

pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Why the backend could not do what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendError {
    Io,
    Unsupported,
}

/// The disk behind the device: a byte-addressed store (a raw image file on the host).
pub trait BlockBackend: Send {
    /// Size in bytes (the device exposes the whole sectors).
    fn size(&self) -> u64;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError>;
    /// Make every completed write durable.
    fn flush(&mut self) -> Result<(), BackendError>;
    /// Deallocate `len` bytes at `offset` (they then read as zeros).
    fn discard(&mut self, _offset: u64, _len: u64) -> Result<(), BackendError> {
        Err(BackendError::Unsupported)
    }
    /// Whether `discard` does anything.
    fn can_discard(&self) -> bool {
        false
    }
}

pub struct Block<B> {
    backend: B,
    read_only: bool,
    id: [u8; ID_BYTES],
    config: [u8; 60],
    bounce: Vec<u8>,
    features: u64,
}

impl<B: BlockBackend> Block<B> {
    /// `id` is what the guest reads as the serial (`/sys/block/vda/serial`), cut to 20 bytes.
    pub fn new(backend: B, read_only: bool, id: &[u8]) -> Self {
        let mut features = feature::SEG_MAX | feature::FLUSH;
        if read_only {
            features |= feature::RO;
        } else if backend.can_discard() {
            features |= feature::DISCARD;
        }
        let mut config = [0u8; 60];
        config[0..8].copy_from_slice(&(backend.size() / SECTOR_SIZE).to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        // max_discard_sectors, max_discard_seg, discard_sector_alignment.
        config[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id[..n]);
        Block {
            backend,
            read_only,
            id: idb,
            config,
            bounce: vec![0; BOUNCE],
            features,
        }
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.backend.size() / SECTOR_SIZE
    }

    /// Handle one request; returns `(status, bytes written into data buffers)`.
    fn execute(&mut self, mem: &dyn GuestMemory, chain: &Chain, data_in: u64) -> (u8, u64) {
        let mut r = chain.reader();
        let mut hdr = [0u8; 16];
        if r.read_exact(mem, &mut hdr).is_err() {
            return (status::IOERR, 0);
        }
        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        match kind {
            req::IN => match self.range(sector, data_in) {
                Some(offset) => self.read(mem, chain, offset, data_in),
                None => (status::IOERR, 0),
            },
            req::OUT => {
                let len = r.remaining();
                match self.range(sector, len) {
                    Some(_) if self.read_only => (status::IOERR, 0),
                    Some(offset) => (self.write(mem, &mut r, offset, len), 0),
                    None => (status::IOERR, 0),
                }
            }
            req::FLUSH => match self.backend.flush() {
                Ok(()) => (status::OK, 0),
                Err(_) => (status::IOERR, 0),
            },
            req::GET_ID => {
                let n = (ID_BYTES as u64).min(data_in) as usize;
                match chain.writer().write(mem, &self.id[..n]) {
                    Ok(n) => (status::OK, n as u64),
                    Err(_) => (status::IOERR, 0),
                }
            }
            req::DISCARD if self.features & feature::DISCARD != 0 => (self.discard(mem, &mut r), 0),
            _ => (status::UNSUPP, 0),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if that is whole sectors on the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.capacity_sectors()).then(|| sector * SECTOR_SIZE)
    }

    fn read(&mut self, mem: &dyn GuestMemory, chain: &Chain, offset: u64, len: u64) -> (u8, u64) {
        let mut w = chain.writer();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(BOUNCE as u64) as usize;
            if self
                .backend
                .read_at(offset + done, &mut self.bounce[..n])
                .is_err()
            {
                return (status::IOERR, done);
            }
            match w.write_all(mem, &self.bounce[..n]) {
                Ok(()) => done += n as u64,
                Err(_) => return (status::IOERR, done),
            }
        }
        (status::OK, done)
    }

    fn write(&mut self, mem: &dyn GuestMemory, r: &mut Reader, offset: u64, len: u64) -> u8 {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(BOUNCE as u64) as usize;
            if r.read_exact(mem, &mut self.bounce[..n]).is_err() {
                return status::IOERR;
            }
            if self
                .backend
                .write_at(offset + done, &self.bounce[..n])
                .is_err()
            {
                return status::IOERR;
            }
            done += n as u64;
        }
        status::OK
    }

    fn discard(&mut self, mem: &dyn GuestMemory, r: &mut Reader) -> u8 {
        let segs = r.remaining() / 16;
        if segs == 0 || !r.remaining().is_multiple_of(16) || segs > u64::from(MAX_DISCARD_SEG) {
            return status::IOERR;
        }
        // Check every segment before discarding any: a request fails as a whole.
        let mut ranges = [(0u64, 0u64); MAX_DISCARD_SEG as usize];
        for range in ranges.iter_mut().take(segs as usize) {
            let mut seg = [0u8; 16];
            if r.read_exact(mem, &mut seg).is_err() {
                return status::IOERR;
            }
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
            let count = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap()));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
            if flags != 0 {
                return status::UNSUPP;
            }
            let Some(offset) = self.range(sector, count * SECTOR_SIZE) else {
                return status::IOERR;
            };
            *range = (offset, count * SECTOR_SIZE);
        }
        for &(offset, len) in &ranges[..segs as usize] {
            match self.backend.discard(offset, len) {
                Ok(()) => {}
                Err(BackendError::Unsupported) => return status::UNSUPP,
                Err(BackendError::Io) => return status::IOERR,
            }
        }
        status::OK
    }
}

/// The status byte: the last byte of the last device-writable descriptor.
fn status_byte(chain: &Chain) -> Option<(u64, u64)> {
    let writable: u64 = chain
        .descs
        .iter()
        .filter(|d| d.writable)
        .map(|d| u64::from(d.len))
        .sum();
    let last: &Descriptor = chain.descs.last().filter(|d| d.writable && d.len > 0)?;
    let addr = last.addr.checked_add(u64::from(last.len) - 1)?;
    Some((addr, writable - 1))
}

impl<B: BlockBackend> VirtioDevice for Block<B> {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn queue_notify(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        mem: &dyn GuestMemory,
    ) -> Result<(), DeviceError> {
        queues[0].process_all(mem, |chain| match status_byte(chain) {
            // Nowhere to put a status: hand the buffers back untouched.
            None => 0,
            Some((status_addr, _)) if !mem.check_range(status_addr, 1) => 0,
            Some((status_addr, data_in)) => {
                // Every buffer must be in guest RAM before any I/O, so that a request
                // either happens as a whole or fails without touching the disk.
                let (st, written) = if chain
                    .descs
                    .iter()
                    .all(|d| mem.check_range(d.addr, u64::from(d.len)))
                {
                    self.execute(mem, chain, data_in)
                } else {
                    (status::IOERR, 0)
                };
                match mem.write(status_addr, &[st]) {
                    Ok(()) => u32::try_from(written + 1).unwrap_or(u32::MAX),
                    Err(_) => 0,
                }
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mem::VecMemory;
    use crate::virtio::testing::DriverQueue;

    /// A disk in a vector, counting flushes.
    pub struct MemDisk {
        pub data: Vec<u8>,
        pub flushes: usize,
    }

    impl BlockBackend for MemDisk {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
            let o = offset as usize;
            self.data[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), BackendError> {
            self.flushes += 1;
            Ok(())
        }
        fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
            self.data[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn can_discard(&self) -> bool {
            true
        }
    }

    struct Rig {
        mem: VecMemory,
        dq: DriverQueue,
        queues: [Queue; 1],
        blk: Block<MemDisk>,
    }

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    fn rig(read_only: bool) -> Rig {
        let mem = VecMemory::new(0, 4 << 20);
        let dq = DriverQueue::new(16, 0);
        let mut queues = [Queue::new(QUEUE_SIZE)];
        dq.configure(&mut queues[0]);
        let data = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let blk = Block::new(MemDisk { data, flushes: 0 }, read_only, b"disk-id");
        Rig {
            mem,
            dq,
            queues,
            blk,
        }
    }

    impl Rig {
        fn header(&self, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write(HDR, &h).unwrap();
            self.mem.write(STATUS, &[0xee]).unwrap();
        }

        /// Submit one chain; returns (status byte, used len).
        fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> (u8, u32) {
            self.dq.add(&self.mem, bufs);
            self.blk
                .queue_notify(0, &mut self.queues, &self.mem)
                .unwrap();
            let used = self.dq.used(&self.mem);
            assert_eq!(used.len(), 1);
            let mut s = [0];
            self.mem.read(STATUS, &mut s).unwrap();
            (s[0], used[0].1)
        }
    }

    #[test]
    fn multi_segment_read_and_write() {
        let mut r = rig(false);
        r.header(req::IN, 2);
        let (st, len) = r.submit(&[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA + 4096, 1024, true),
            (STATUS, 1, true),
        ]);
        assert_eq!((st, len), (status::OK, 1537));
        let mut got = vec![0; 512];
        r.mem.read(DATA, &mut got).unwrap();
        assert_eq!(got[..], r.blk.backend.data[1024..1536]);

        r.mem.write(DATA, &[7; 512]).unwrap();
        r.mem.write(DATA + 4096, &[9; 512]).unwrap();
        r.header(req::OUT, 10);
        let (st, len) = r.submit(&[
            (HDR, 16, false),
            (DATA, 512, false),
            (DATA + 4096, 512, false),
            (STATUS, 1, true),
        ]);
        assert_eq!((st, len), (status::OK, 1));
        assert!(r.blk.backend.data[5120..5632].iter().all(|&b| b == 7));
        assert!(r.blk.backend.data[5632..6144].iter().all(|&b| b == 9));

        r.header(req::FLUSH, 0);
        assert_eq!(
            r.submit(&[(HDR, 16, false), (STATUS, 1, true)]).0,
            status::OK
        );
        assert_eq!(r.blk.backend.flushes, 1);
    }

    #[test]
    fn get_id_and_unknown_types() {
        let mut r = rig(false);
        r.header(req::GET_ID, 0);
        let (st, len) = r.submit(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
        assert_eq!((st, len), (status::OK, 21));
        let mut id = [0; 20];
        r.mem.read(DATA, &mut id).unwrap();
        assert_eq!(&id[..8], b"disk-id\0");
        r.header(99, 0);
        assert_eq!(
            r.submit(&[(HDR, 16, false), (STATUS, 1, true)]).0,
            status::UNSUPP
        );
    }

    #[test]
    fn read_only_disks_refuse_writes_and_discards() {
        let mut r = rig(true);
        assert_ne!(r.blk.features() & feature::RO, 0);
        let before = r.blk.backend.data.clone();
        r.header(req::OUT, 0);
        assert_eq!(
            r.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
                .0,
            status::IOERR
        );
        r.header(req::DISCARD, 0);
        assert_eq!(
            r.submit(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)])
                .0,
            status::UNSUPP
        );
        assert_eq!(r.blk.backend.data, before, "the disk is unchanged");
    }

    #[test]
    fn discard_zeroes_the_range() {
        let mut r = rig(false);
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&4u64.to_le_bytes());
        seg[8..12].copy_from_slice(&2u32.to_le_bytes());
        r.mem.write(DATA, &seg).unwrap();
        r.header(req::DISCARD, 0);
        assert_eq!(
            r.submit(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)])
                .0,
            status::OK
        );
        assert!(r.blk.backend.data[2048..3072].iter().all(|&b| b == 0));
        assert_ne!(r.blk.backend.data[3072], 0);
    }

    #[test]
    fn hostile_requests_get_ioerr() {
        let mut r = rig(false);
        let disk = r.blk.backend.data.clone();
        // Past the end of the disk; a sector number that overflows; not whole sectors.
        for (sector, len) in [(127, 1024), (u64::MAX, 512), (0, 100)] {
            r.header(req::IN, sector);
            assert_eq!(
                r.submit(&[(HDR, 16, false), (DATA, len, true), (STATUS, 1, true)])
                    .0,
                status::IOERR
            );
            r.header(req::OUT, sector);
            assert_eq!(
                r.submit(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)])
                    .0,
                status::IOERR
            );
        }
        // Header too short.
        r.header(req::IN, 0);
        assert_eq!(
            r.submit(&[(HDR, 8, false), (STATUS, 1, true)]).0,
            status::IOERR
        );
        // Data buffer outside guest RAM (huge length, address at the top).
        r.header(req::OUT, 0);
        assert_eq!(
            r.submit(&[
                (HDR, 16, false),
                (u64::MAX - 511, 512, false),
                (STATUS, 1, true)
            ])
            .0,
            status::IOERR
        );
        r.header(req::IN, 0);
        assert_eq!(
            r.submit(&[
                (HDR, 16, false),
                (1 << 40, 0xffff_fe00, true),
                (STATUS, 1, true)
            ])
            .0,
            status::IOERR
        );
        assert_eq!(r.blk.backend.data, disk, "nothing was written");
        // No writable status byte: returned with length 0, nothing else happens.
        r.header(req::OUT, 0);
        let (_, len) = r.submit(&[(HDR, 16, false), (DATA, 512, false)]);
        assert_eq!(len, 0);
    }
}
