//! A virtio-mmio driver for VM0's own devices: how a device task uses the disk, the
//! network interface or the entropy source the vmm gives VM0 as its backend.
//!
//! Up to `MAX_QUEUES` queues of `QUEUE_SIZE` descriptors. Their rings, and the
//! buffers the caller lays out (a request header, a status byte, data), live in a DMA
//! window: memory whose VM0-physical address the task knows, given by the root. A
//! caller either runs one request at a time (`run`: offer, notify, wait for it to be
//! used) or keeps buffers offered and collects them as the device uses them
//! (`offer` / `notify` / `used`, a network receive queue).
//!
//! The device's interrupt comes as IPC from `irq(line)`. Whoever receives it calls
//! [`Irq::acknowledge`] (the device's interrupt status, then the kernel's line) and
//! only then looks at the used rings, so a buffer used after the look raises a new
//! interrupt. `run` waits for the interrupt with a one-tick timeout and looks again
//! after each: a lost edge costs a tick, not the request.

use core::sync::atomic::{fence, Ordering};

use devices::virtio::mmio::{reg, status};
use devices::virtio::GuestMemory;

use crate::abi::{irq_control, ThreadId, Timeout};
use crate::mmio::{Regs, Window};
use crate::msg::{receive, NO_WINDOW};
use crate::sys;

/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 8;
/// Queues the driver sets up, at most.
pub const MAX_QUEUES: usize = 2;
/// Queue `q`'s rings are at `q * RINGS` in the DMA window: descriptors, then the
/// driver ring at `AVAIL`, the device ring at `USED`.
const RINGS: u64 = 0x400;
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
/// How big the DMA window must be, at least.
pub const DMA_BYTES: u64 = DATA + DATA_LEN as u64;
/// How long a request may take: 30 s in 10 ms ticks, or this many interrupts that
/// did not complete it.
const REQUEST_TICKS: u32 = 3000;
const REQUEST_IRQS: u32 = 100_000;

const MAGIC: u32 = 0x7472_6976;
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
/// `VIRTIO_F_VERSION_1`, in the high feature word.
const VERSION_1_HI: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverError {
    /// No virtio-mmio v2 device at the registers.
    NotVirtio,
    /// The device refused our features or has too few or too small queues.
    Setup,
    /// The DMA window is too small, a buffer lies outside it, or the device named a
    /// descriptor that does not exist.
    Dma,
    /// No completion within `REQUEST_TICKS`.
    Timeout,
}

/// The device's interrupt: its line and how to acknowledge it.
#[derive(Clone, Copy)]
pub struct Irq {
    regs: Regs,
    pub line: u16,
}

impl Irq {
    /// The device interrupted (its IPC arrived): clear its interrupt status and unmask
    /// the line. Look at the used rings after this, not before.
    pub fn acknowledge(&self) {
        let isr = self.regs.read32(reg::INTERRUPT_STATUS);
        self.regs.write32(reg::INTERRUPT_ACK, isr);
        let _ = sys::irq_control(irq_control::ACK, u64::from(self.line), ThreadId::NIL);
    }
}

/// Where the driver is in one queue.
#[derive(Clone, Copy, Default)]
struct Ring {
    next_avail: u16,
    next_used: u16,
}

pub struct Driver {
    regs: Regs,
    dma: Window,
    irq: Irq,
    rings: [Ring; MAX_QUEUES],
    queues: usize,
    /// The device type (`devices::virtio::device_type`).
    pub device_id: u32,
    /// The low feature word the device offers.
    pub features: u32,
}

impl Driver {
    /// Reset the device at `regs`, accept `VERSION_1` and the low features in `accept`
    /// that it offers, and set up its first `queues` queues in `dma`. Interrupt line
    /// `irq` must be attached to the calling thread.
    pub fn new(
        regs: Regs,
        dma: Window,
        irq: u16,
        accept: u32,
        queues: usize,
    ) -> Result<Self, DriverError> {
        if regs.read32(reg::MAGIC) != MAGIC || regs.read32(reg::VERSION) != 2 {
            return Err(DriverError::NotVirtio);
        }
        if dma.len() < DMA_BYTES || !(1..=MAX_QUEUES).contains(&queues) {
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
        let base = dma.origin();
        dma.write(base, &[0u8; RINGS as usize * MAX_QUEUES]).map_err(|_| DriverError::Dma)?;
        for q in 0..queues {
            regs.write32(reg::QUEUE_SEL, q as u32);
            if regs.read32(reg::QUEUE_NUM_MAX) < u32::from(QUEUE_SIZE) {
                return Err(DriverError::Setup);
            }
            regs.write32(reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
            let rings = base + q as u64 * RINGS;
            for (r, at) in [
                (reg::QUEUE_DESC_LOW, rings),
                (reg::QUEUE_DRIVER_LOW, rings + AVAIL),
                (reg::QUEUE_DEVICE_LOW, rings + USED),
            ] {
                regs.write32(r, at as u32);
                regs.write32(r + 4, (at >> 32) as u32);
            }
            regs.write32(reg::QUEUE_READY, 1);
        }
        regs.write32(reg::STATUS, s | status::DRIVER_OK);
        if regs.read32(reg::STATUS) & status::NEEDS_RESET != 0 {
            return Err(DriverError::Setup);
        }
        let irq = Irq { regs, line: irq };
        let rings = [Ring::default(); MAX_QUEUES];
        Ok(Self { regs, dma, irq, rings, queues, device_id, features })
    }

    /// The DMA window (addressed by VM0-physical address: `phys(offset)`).
    pub fn dma(&self) -> &Window {
        &self.dma
    }

    /// The VM0-physical address of `offset` in the DMA window.
    pub fn phys(&self, offset: u64) -> u64 {
        self.dma.origin() + offset
    }

    /// The device's interrupt.
    pub fn irq(&self) -> Irq {
        self.irq
    }

    /// A little-endian value from the device's configuration space.
    pub fn config_u64(&self, offset: u64) -> u64 {
        let lo = self.regs.read32(reg::CONFIG + offset);
        let hi = self.regs.read32(reg::CONFIG + offset + 4);
        u64::from(lo) | u64::from(hi) << 32
    }

    /// Run one request on queue 0 whose buffers are `(offset in the DMA window, length,
    /// device-writable)`; returns the bytes the device wrote.
    pub fn run(&mut self, bufs: &[(u64, u32, bool)]) -> Result<u32, DriverError> {
        self.run_on(0, bufs)
    }

    /// `run` on queue `q`, which has no other request offered.
    pub fn run_on(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> Result<u32, DriverError> {
        self.offer(q, 0, bufs)?;
        self.notify(q);
        // ticks without an interrupt, and interrupts that brought no completion (another
        // queue's): either bound ends the wait
        let (mut ticks, mut irqs) = (0u32, 0u32);
        loop {
            if let Some((_, len)) = self.used(q)? {
                return Ok(len);
            }
            if ticks >= REQUEST_TICKS || irqs >= REQUEST_IRQS {
                return Err(DriverError::Timeout);
            }
            // the interrupt, or a tick to look again
            if receive(ThreadId::irq(self.irq.line), Timeout(1), NO_WINDOW).is_ok() {
                self.irq.acknowledge();
                irqs += 1;
            } else {
                ticks += 1;
            }
        }
    }

    /// Offer `bufs` on queue `q` as one chain in descriptors `first..`; the device sees
    /// it at the next `notify`.
    pub fn offer(
        &mut self,
        q: usize,
        first: u16,
        bufs: &[(u64, u32, bool)],
    ) -> Result<(), DriverError> {
        let last = usize::from(first) + bufs.len();
        if q >= self.queues || bufs.is_empty() || last > usize::from(QUEUE_SIZE) {
            return Err(DriverError::Dma);
        }
        let (origin, rings) = (self.dma.origin(), q as u64 * RINGS);
        for (i, &(offset, len, writable)) in bufs.iter().enumerate() {
            if !self.dma.check_range(origin + offset, u64::from(len)) {
                return Err(DriverError::Dma);
            }
            let d = first + i as u16;
            let end = i + 1 == bufs.len();
            let flags = if end { 0 } else { DESC_NEXT } | if writable { DESC_WRITE } else { 0 };
            let mut desc = [0u8; 16];
            desc[0..8].copy_from_slice(&(origin + offset).to_le_bytes());
            desc[8..12].copy_from_slice(&len.to_le_bytes());
            desc[12..14].copy_from_slice(&flags.to_le_bytes());
            desc[14..16].copy_from_slice(&(if end { 0 } else { d + 1 }).to_le_bytes());
            self.write(rings + 16 * u64::from(d), &desc)?;
        }
        let ring = &mut self.rings[q];
        let slot = u64::from(ring.next_avail % QUEUE_SIZE);
        ring.next_avail = ring.next_avail.wrapping_add(1);
        let next = ring.next_avail;
        self.write(rings + AVAIL + 4 + 2 * slot, &first.to_le_bytes())?;
        fence(Ordering::SeqCst);
        self.dma.store_u16(self.phys(rings + AVAIL + 2), next).map_err(|_| DriverError::Dma)
    }

    /// Tell the device that queue `q` has new buffers.
    pub fn notify(&self, q: usize) {
        fence(Ordering::SeqCst);
        self.regs.write32(reg::QUEUE_NOTIFY, q as u32);
    }

    /// The next chain the device has used on queue `q`, if any: its first descriptor
    /// and the bytes the device wrote into it.
    pub fn used(&mut self, q: usize) -> Result<Option<(u16, u32)>, DriverError> {
        if q >= self.queues {
            return Err(DriverError::Dma);
        }
        let rings = q as u64 * RINGS;
        let idx = self.dma.load_u16(self.phys(rings + USED + 2)).map_err(|_| DriverError::Dma)?;
        let next = self.rings[q].next_used;
        if idx == next {
            return Ok(None);
        }
        fence(Ordering::SeqCst);
        let elem = self.phys(rings + USED + 4 + 8 * u64::from(next % QUEUE_SIZE));
        let id = self.dma.read_u32(elem).map_err(|_| DriverError::Dma)?;
        let len = self.dma.read_u32(elem + 4).map_err(|_| DriverError::Dma)?;
        self.rings[q].next_used = next.wrapping_add(1);
        let id = u16::try_from(id).ok().filter(|&d| d < QUEUE_SIZE).ok_or(DriverError::Dma)?;
        Ok(Some((id, len)))
    }

    /// Whether the device has used a chain on queue `q` that `used` has not returned.
    pub fn has_used(&self, q: usize) -> bool {
        let at = self.phys(q as u64 * RINGS + USED + 2);
        q < self.queues && self.dma.load_u16(at).is_ok_and(|idx| idx != self.rings[q].next_used)
    }

    fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), DriverError> {
        self.dma.write(self.phys(offset), bytes).map_err(|_| DriverError::Dma)
    }
}
