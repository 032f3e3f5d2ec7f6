//! A virtio-mmio driver for VM0's own devices: how a device task uses the disk or the
//! entropy source the vmm gives VM0 as its backend.
//!
//! One queue of `QUEUE_SIZE` descriptors and one request at a time. The rings, a
//! request header, a status byte and a 64 KiB data buffer live in a DMA window (memory
//! whose VM0-physical address the task knows, given by the root). Completion comes as
//! the device's interrupt, delivered by the kernel as IPC; the driver polls the used
//! ring between interrupts too, so a lost edge costs a tick, not the request.

use core::sync::atomic::{fence, Ordering};

use devices::virtio::mmio::{reg, status};
use devices::virtio::GuestMemory;

use crate::abi::{irq_control, ThreadId, Timeout};
use crate::mmio::{Regs, Window};
use crate::msg::{receive, NO_WINDOW};
use crate::sys;

/// Descriptors in the one queue.
pub const QUEUE_SIZE: u16 = 8;
/// Offsets in the DMA window.
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
/// A 16-byte request header (virtio-blk).
pub const HEADER: u64 = 0x1000;
/// The device's status byte.
pub const STATUS: u64 = 0x1010;
/// A small reply buffer (e.g. a disk's id).
pub const SMALL: u64 = 0x1020;
/// The data buffer.
pub const DATA: u64 = 0x2000;
pub const DATA_LEN: usize = 64 << 10;
/// How big the DMA window must be.
pub const DMA_BYTES: u64 = DATA + DATA_LEN as u64;
/// How long a request may take: 30 s in 10 ms ticks.
const REQUEST_TICKS: u32 = 3000;

const MAGIC: u32 = 0x7472_6976;
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
/// `VIRTIO_F_VERSION_1`, in the high feature word.
const VERSION_1_HI: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverError {
    /// No virtio-mmio v2 device at the registers.
    NotVirtio,
    /// The device refused our features or has no usable queue.
    Setup,
    /// The DMA window is too small or a buffer lies outside it.
    Dma,
    /// No completion within `REQUEST_TICKS`.
    Timeout,
}

pub struct Driver {
    regs: Regs,
    dma: Window,
    irq: u16,
    next_avail: u16,
    /// The device type (`devices::virtio::device_type`).
    pub device_id: u32,
    /// The low feature word the device offers.
    pub features: u32,
}

impl Driver {
    /// Reset the device at `regs`, accept `VERSION_1` and the low features in `accept`
    /// that it offers, and set up queue 0 in `dma`. Interrupt line `irq` must be
    /// attached to the calling thread.
    pub fn new(regs: Regs, dma: Window, irq: u16, accept: u32) -> Result<Self, DriverError> {
        if regs.read32(reg::MAGIC) != MAGIC || regs.read32(reg::VERSION) != 2 {
            return Err(DriverError::NotVirtio);
        }
        if dma.len() < DMA_BYTES {
            return Err(DriverError::Dma);
        }
        let device_id = regs.read32(reg::DEVICE_ID);
        regs.write32(reg::STATUS, 0);
        regs.write32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        regs.write32(reg::DEVICE_FEATURES_SEL, 0);
        let features = regs.read32(reg::DEVICE_FEATURES);
        regs.write32(reg::DEVICE_FEATURES_SEL, 1);
        if regs.read32(reg::DEVICE_FEATURES) & VERSION_1_HI == 0 {
            return Err(DriverError::Setup);
        }
        regs.write32(reg::DRIVER_FEATURES_SEL, 0);
        regs.write32(reg::DRIVER_FEATURES, features & accept);
        regs.write32(reg::DRIVER_FEATURES_SEL, 1);
        regs.write32(reg::DRIVER_FEATURES, VERSION_1_HI);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        regs.write32(reg::STATUS, s);
        if regs.read32(reg::STATUS) & status::FEATURES_OK == 0 {
            return Err(DriverError::Setup);
        }
        regs.write32(reg::QUEUE_SEL, 0);
        if regs.read32(reg::QUEUE_NUM_MAX) < u32::from(QUEUE_SIZE) {
            return Err(DriverError::Setup);
        }
        let zeros = [0u8; 0x300];
        let base = dma.origin();
        dma.write(base, &zeros).map_err(|_| DriverError::Dma)?;
        regs.write32(reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
        for (r, at) in [
            (reg::QUEUE_DESC_LOW, DESC),
            (reg::QUEUE_DRIVER_LOW, AVAIL),
            (reg::QUEUE_DEVICE_LOW, USED),
        ] {
            regs.write32(r, (base + at) as u32);
            regs.write32(r + 4, ((base + at) >> 32) as u32);
        }
        regs.write32(reg::QUEUE_READY, 1);
        regs.write32(reg::STATUS, s | status::DRIVER_OK);
        if regs.read32(reg::STATUS) & status::NEEDS_RESET != 0 {
            return Err(DriverError::Setup);
        }
        Ok(Self { regs, dma, irq, next_avail: 0, device_id, features })
    }

    /// The DMA window (addressed by VM0-physical address: `phys(offset)`).
    pub fn dma(&self) -> &Window {
        &self.dma
    }

    /// The VM0-physical address of `offset` in the DMA window.
    pub fn phys(&self, offset: u64) -> u64 {
        self.dma.origin() + offset
    }

    /// A little-endian value from the device's configuration space.
    pub fn config_u64(&self, offset: u64) -> u64 {
        let lo = self.regs.read32(reg::CONFIG + offset);
        let hi = self.regs.read32(reg::CONFIG + offset + 4);
        u64::from(lo) | u64::from(hi) << 32
    }

    /// Run one request whose buffers are `(offset in the DMA window, length,
    /// device-writable)`; returns the bytes the device wrote.
    pub fn run(&mut self, bufs: &[(u64, u32, bool)]) -> Result<u32, DriverError> {
        if bufs.is_empty() || bufs.len() > usize::from(QUEUE_SIZE) {
            return Err(DriverError::Dma);
        }
        let origin = self.dma.origin();
        for (i, &(offset, len, writable)) in bufs.iter().enumerate() {
            if !self.dma.check_range(origin + offset, u64::from(len)) {
                return Err(DriverError::Dma);
            }
            let last = i + 1 == bufs.len();
            let flags = if last { 0 } else { DESC_NEXT } | if writable { DESC_WRITE } else { 0 };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&(origin + offset).to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&(if last { 0 } else { i as u16 + 1 }).to_le_bytes());
            self.write(DESC + 16 * i as u64, &d)?;
        }
        let slot = u64::from(self.next_avail % QUEUE_SIZE);
        self.write(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes())?;
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.store_u16(AVAIL + 2, self.next_avail)?;
        fence(Ordering::SeqCst);
        self.regs.write32(reg::QUEUE_NOTIFY, 0);
        self.complete()
    }

    /// Wait until the device has used the request just made available.
    fn complete(&mut self) -> Result<u32, DriverError> {
        let mut ticks = 0;
        loop {
            let used = self.dma.load_u16(self.phys(USED + 2)).map_err(|_| DriverError::Dma)?;
            if used == self.next_avail {
                fence(Ordering::SeqCst);
                let slot = u64::from(used.wrapping_sub(1) % QUEUE_SIZE);
                let len = self.dma.read_u32(self.phys(USED + 4 + 8 * slot + 4));
                return len.map_err(|_| DriverError::Dma);
            }
            if ticks >= REQUEST_TICKS {
                return Err(DriverError::Timeout);
            }
            // the interrupt, or a tick to look again (an edge lost while masked)
            if receive(ThreadId::irq(self.irq), Timeout(1), NO_WINDOW).is_ok() {
                let isr = self.regs.read32(reg::INTERRUPT_STATUS);
                self.regs.write32(reg::INTERRUPT_ACK, isr);
                let _ = sys::irq_control(irq_control::ACK, u64::from(self.irq), ThreadId::NIL);
            } else {
                ticks += 1;
            }
        }
    }

    fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), DriverError> {
        self.dma.write(self.phys(offset), bytes).map_err(|_| DriverError::Dma)
    }

    fn store_u16(&self, offset: u64, v: u16) -> Result<(), DriverError> {
        self.dma.store_u16(self.phys(offset), v).map_err(|_| DriverError::Dma)
    }
}
