//! The virtio-mmio transport, version 2 ("modern", virtio 1.x §4.2.2).
//!
//! One 4 KiB register window per device. The transport owns the device's queues and
//! the negotiation state, and enforces the status state machine: bits are only ever
//! added (writing 0 resets), `FEATURES_OK` sticks only for a subset of what was offered
//! that includes `VERSION_1`, queues can be configured only before `DRIVER_OK`, and
//! notifications before `DRIVER_OK` (or after `DEVICE_NEEDS_RESET`) are ignored.
//!
//! `InterruptStatus` lives in an `Arc<AtomicU32>` so the host can answer the guest's
//! interrupt-status reads and acks without waiting for a device that is busy with I/O.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

use super::features::{RING_EVENT_IDX, VERSION_1};
use super::{GuestMemory, Interrupt, Queue, VirtioDevice, INT_CONFIG, INT_USED_RING};

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

const MAGIC: u32 = 0x7472_6976; // "virt"
/// Our vendor ID: "RVMM" is not registered anywhere; Linux does not care.
const VENDOR: u32 = 0x4d4d_5652;

/// What the driver set up in a transport, enough for another instance of the device
/// to carry on (a device task restarted after a fault): negotiation, status and queue
/// configuration. Queue positions are not in it: `restore` reads them back from the
/// used rings, which say what the guest was told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub queues: Vec<SavedQueue>,
}

/// One queue's configuration in [`Saved`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SavedQueue {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl Saved {
    /// First word of the encoding ("vsaved01").
    const TAG: u64 = 0x7673_6176_6564_3031;
    /// Words before the queues, and per queue.
    const HEAD: usize = 6;
    const PER_QUEUE: usize = 4;
    /// The most queues an encoding may claim (more is corruption).
    const MAX_QUEUES: usize = 64;

    /// As words, for a page that outlives the device's instance: a tag, the length,
    /// the fields, and a checksum last.
    pub fn to_words(&self) -> Vec<u64> {
        let mut w = alloc::vec![
            Self::TAG,
            (Self::HEAD + Self::PER_QUEUE * self.queues.len() + 1) as u64,
            u64::from(self.status) | u64::from(self.config_generation) << 32,
            self.driver_features,
            u64::from(self.device_features_sel) | u64::from(self.driver_features_sel) << 32,
            u64::from(self.queue_sel) | (self.queues.len() as u64) << 32,
        ];
        for q in &self.queues {
            w.extend([
                u64::from(q.size) | u64::from(q.ready) << 16,
                q.desc_table,
                q.avail_ring,
                q.used_ring,
            ]);
        }
        w.push(checksum(&w));
        w
    }

    /// The inverse of `to_words`: None for anything else (never written, torn, stale).
    pub fn from_words(w: &[u64]) -> Option<Saved> {
        let (&tag, &len) = (w.first()?, w.get(1)?);
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l > Self::HEAD && l <= w.len())?;
        let nq = (w[5] >> 32) as usize;
        if tag != Self::TAG
            || nq > Self::MAX_QUEUES
            || len != Self::HEAD + Self::PER_QUEUE * nq + 1
            || checksum(&w[..len - 1]) != w[len - 1]
        {
            return None;
        }
        let queues = w[Self::HEAD..len - 1]
            .chunks_exact(Self::PER_QUEUE)
            .map(|q| SavedQueue {
                size: q[0] as u16,
                ready: q[0] >> 16 & 1 == 1,
                desc_table: q[1],
                avail_ring: q[2],
                used_ring: q[3],
            })
            .collect();
        Some(Saved {
            status: w[2] as u32,
            config_generation: (w[2] >> 32) as u32,
            driver_features: w[3],
            device_features_sel: w[4] as u32,
            driver_features_sel: (w[4] >> 32) as u32,
            queue_sel: w[5] as u32,
            queues,
        })
    }
}

/// FNV-1a over the words' bytes.
fn checksum(words: &[u64]) -> u64 {
    words
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
}

/// Why `restore` could not take a saved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("the saved state has {saved} queues, this device {device}")]
    Queues { saved: usize, device: usize },
}

/// A virtio device behind its mmio register window.
pub struct MmioTransport<D, M> {
    device: D,
    mem: M,
    interrupt: Box<dyn Interrupt>,
    isr: Arc<AtomicU32>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    config_generation: u32,
}

impl<D: VirtioDevice, M: GuestMemory> MmioTransport<D, M> {
    pub fn new(device: D, mem: M, interrupt: Box<dyn Interrupt>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&n| Queue::new(n))
            .collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            isr: Arc::new(AtomicU32::new(0)),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The `InterruptStatus` register, for lock-free reads and acks.
    pub fn interrupt_status(&self) -> Arc<AtomicU32> {
        self.isr.clone()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver is up and the device has not failed.
    pub fn is_active(&self) -> bool {
        self.status & (status::DRIVER_OK | status::NEEDS_RESET) == status::DRIVER_OK
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VERSION_1 | RING_EVENT_IDX
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The guest reads `data.len()` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            // Registers are 32 bits wide; anything else is a driver bug.
            data.fill(0);
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let value = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_NUM => q.map_or(0, |q| u32::from(q.size)),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.isr.load(Ordering::SeqCst),
            reg::STATUS => self.status,
            reg::QUEUE_DESC_LOW => q.map_or(0, |q| q.desc_table as u32),
            reg::QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc_table >> 32) as u32),
            reg::QUEUE_DRIVER_LOW => q.map_or(0, |q| q.avail_ring as u32),
            reg::QUEUE_DRIVER_HIGH => q.map_or(0, |q| (q.avail_ring >> 32) as u32),
            reg::QUEUE_DEVICE_LOW => q.map_or(0, |q| q.used_ring as u32),
            reg::QUEUE_DEVICE_HIGH => q.map_or(0, |q| (q.used_ring >> 32) as u32),
            // No shared memory regions: length -1.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// The guest writes `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        // Queue registers may be written only while setting the device up.
        let configuring =
            self.status & (status::FEATURES_OK | status::DRIVER_OK) == status::FEATURES_OK;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES
                if self.status & (status::DRIVER | status::FEATURES_OK) == status::DRIVER =>
            {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features &= !(0xffff_ffffu64 << shift);
                self.driver_features |= u64::from(v) << shift;
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => self.notify(v as usize),
            reg::INTERRUPT_ACK => {
                self.isr.fetch_and(!v, Ordering::SeqCst);
            }
            reg::STATUS => self.set_status(v),
            _ if configuring => self.write_queue_reg(offset, v),
            _ => {}
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        let Some(q) = self.selected_queue() else {
            return;
        };
        if q.ready && offset != reg::QUEUE_READY {
            return;
        }
        let lo = |a: u64| (a & !0xffff_ffff) | u64::from(v);
        let hi = |a: u64| (a & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            // Sizes above u16 are kept as 0, which validation refuses.
            reg::QUEUE_NUM => q.size = u16::try_from(v).unwrap_or(0),
            reg::QUEUE_READY => q.ready = v == 1,
            reg::QUEUE_DESC_LOW => q.desc_table = lo(q.desc_table),
            reg::QUEUE_DESC_HIGH => q.desc_table = hi(q.desc_table),
            reg::QUEUE_DRIVER_LOW => q.avail_ring = lo(q.avail_ring),
            reg::QUEUE_DRIVER_HIGH => q.avail_ring = hi(q.avail_ring),
            reg::QUEUE_DEVICE_LOW => q.used_ring = lo(q.used_ring),
            reg::QUEUE_DEVICE_HIGH => q.used_ring = hi(q.used_ring),
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits are only added; anything else is ignored.
        if v & self.status != self.status {
            return;
        }
        let new = v & !self.status;
        if new & status::FEATURES_OK != 0 {
            let offered = self.offered_features();
            let f = self.driver_features;
            if f & !offered != 0 || f & VERSION_1 == 0 {
                // Not accepted: the driver reads the status back and gives up.
                self.status = v & !(status::FEATURES_OK | status::DRIVER_OK);
                return;
            }
        }
        if new & status::DRIVER_OK != 0 {
            if self.status & status::FEATURES_OK == 0 && new & status::FEATURES_OK == 0 {
                return;
            }
            self.status = v;
            self.start_queues(false);
            return;
        }
        self.status = v;
    }

    /// The driver's queues go live (at `DRIVER_OK`, or in a restored instance with
    /// `resume`): each ready queue learns the negotiated event-index mode, is validated
    /// and, with `resume`, takes up where its used ring says; then the device is
    /// activated. A queue that fails means `DEVICE_NEEDS_RESET` instead. Returns whether
    /// the device went live.
    fn start_queues(&mut self, resume: bool) -> bool {
        let event_idx = self.driver_features & RING_EVENT_IDX != 0;
        let mem: &dyn GuestMemory = &self.mem;
        let mut valid = true;
        for q in self.queues.iter_mut().filter(|q| q.ready) {
            q.set_event_idx(event_idx);
            valid &= q.validate(mem).is_ok() && (!resume || q.resume(mem).is_ok());
        }
        if !valid {
            self.needs_reset();
            return false;
        }
        self.device.activate(self.driver_features);
        true
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.isr.store(0, Ordering::SeqCst);
    }

    /// The device cannot go on (e.g. a restarted instance found no state to carry on
    /// from): set `DEVICE_NEEDS_RESET` and raise the configuration interrupt, which is
    /// all virtio gives a device to ask the driver for a reset.
    pub fn fail(&mut self) {
        self.needs_reset();
    }

    fn needs_reset(&mut self) {
        self.status |= status::NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.isr.fetch_or(INT_CONFIG, Ordering::SeqCst);
        self.interrupt.trigger();
    }

    /// The driver-visible setup, for another instance to `restore`.
    pub fn save(&self) -> Saved {
        Saved {
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| SavedQueue {
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                })
                .collect(),
        }
    }

    /// Carry on where another instance of this device left off (it died: a device task
    /// that faulted). A fresh transport takes the driver's setup from `saved`; if the
    /// driver had the device running, the queues resume where their used rings say
    /// (`Queue::resume`: a chain the old instance took but never gave back is taken
    /// again), the device is activated with the negotiated features, and a used-ring
    /// interrupt is raised, since the old instance may have used buffers and died
    /// before it told the guest. A setup that no longer validates means
    /// `DEVICE_NEEDS_RESET`, as it would have at `DRIVER_OK`.
    pub fn restore(&mut self, saved: &Saved) -> Result<(), RestoreError> {
        if saved.queues.len() != self.queues.len() {
            return Err(RestoreError::Queues {
                saved: saved.queues.len(),
                device: self.queues.len(),
            });
        }
        self.status = saved.status;
        self.driver_features = saved.driver_features;
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.queue_sel = saved.queue_sel;
        self.config_generation = saved.config_generation;
        for (q, s) in self.queues.iter_mut().zip(&saved.queues) {
            q.size = s.size;
            q.ready = s.ready;
            q.desc_table = s.desc_table;
            q.avail_ring = s.avail_ring;
            q.used_ring = s.used_ring;
        }
        if self.is_active() && self.start_queues(true) {
            self.isr.fetch_or(INT_USED_RING, Ordering::SeqCst);
            self.interrupt.trigger();
        }
        Ok(())
    }

    /// The driver kicked queue `index` (an ioeventfd fired, or a `QueueNotify` write).
    pub fn notify(&mut self, index: usize) {
        if !self.is_active() || !self.queues.get(index).is_some_and(|q| q.ready) {
            return;
        }
        let r = self.device.queue_notify(index, &mut self.queues, &self.mem);
        self.after_work(r);
    }

    /// The backend has input for the guest.
    pub fn backend_ready(&mut self) {
        if !self.is_active() {
            return;
        }
        let r = self.device.backend_ready(&mut self.queues, &self.mem);
        self.after_work(r);
    }

    /// Raise the used-buffer interrupt if any queue's driver wants it, or fail the device.
    fn after_work(&mut self, r: Result<(), super::DeviceError>) {
        if r.is_err() {
            self.needs_reset();
            return;
        }
        let mut notify = false;
        let mut broken = false;
        for q in self.queues.iter_mut().filter(|q| q.ready) {
            match q.needs_notification(&self.mem) {
                Ok(n) => notify |= n,
                Err(_) => broken = true,
            }
        }
        if broken {
            self.needs_reset();
        } else if notify {
            self.isr.fetch_or(INT_USED_RING, Ordering::SeqCst);
            self.interrupt.trigger();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mem::VecMemory;
    use crate::virtio::rng::{EntropyError, EntropySource, Rng};
    use crate::virtio::testing::DriverQueue;
    use core::sync::atomic::AtomicUsize;

    struct Zeros;
    impl EntropySource for Zeros {
        fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
            buf.fill(0x5a);
            Ok(())
        }
    }

    struct CountIrq(Arc<AtomicUsize>);
    impl Interrupt for CountIrq {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    type T = MmioTransport<Rng<Zeros>, VecMemory>;

    fn transport() -> (T, Arc<AtomicUsize>) {
        let irqs = Arc::new(AtomicUsize::new(0));
        let t = MmioTransport::new(
            Rng::new(Zeros),
            VecMemory::new(0, 1 << 20),
            Box::new(CountIrq(irqs.clone())),
        );
        (t, irqs)
    }

    fn r(t: &T, off: u64) -> u32 {
        let mut b = [0; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut T, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// The driver's side of initialization, as Linux does it, for queue 0 at `dq`.
    fn bring_up(t: &mut T, dq: &DriverQueue, features_hi: u32) {
        w(t, reg::STATUS, 0);
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, features_hi);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, 0);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_NUM, u32::from(dq.size));
        w(t, reg::QUEUE_DESC_LOW, dq.desc as u32);
        w(t, reg::QUEUE_DRIVER_LOW, dq.avail as u32);
        w(t, reg::QUEUE_DEVICE_LOW, dq.used as u32);
        w(t, reg::QUEUE_READY, 1);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    #[test]
    fn identity_registers() {
        let (t, _) = transport();
        assert_eq!(r(&t, reg::MAGIC), MAGIC);
        assert_eq!(r(&t, reg::VERSION), 2);
        assert_eq!(r(&t, reg::DEVICE_ID), 4);
        assert_eq!(r(&t, reg::QUEUE_NUM_MAX), 64);
        assert_eq!(r(&t, 0x0c8), 0, "unknown register reads zero");
        let mut b = [0xff; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0], "registers are 32-bit only");
    }

    #[test]
    fn a_full_bring_up_then_a_request_raises_an_interrupt() {
        let (mut t, irqs) = transport();
        let mut dq = DriverQueue::new(16, 0x1000);
        bring_up(&mut t, &dq, 1); // VERSION_1
        assert!(t.is_active());
        dq.add(&t.mem, &[(0x8000, 8, true)]);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(dq.used(&t.mem), [(0, 8)]);
        assert_eq!(irqs.load(Ordering::SeqCst), 1);
        assert_eq!(r(&t, reg::INTERRUPT_STATUS), INT_USED_RING);
        w(&mut t, reg::INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r(&t, reg::INTERRUPT_STATUS), 0);
        // Reset clears everything.
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&t, reg::STATUS), 0);
        assert_eq!(r(&t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn features_ok_needs_version_1_and_a_subset() {
        let (mut t, _) = transport();
        let dq = DriverQueue::new(16, 0x1000);
        bring_up(&mut t, &dq, 0); // legacy driver: no VERSION_1
        assert_eq!(r(&t, reg::STATUS) & status::FEATURES_OK, 0);
        assert!(!t.is_active());
        bring_up(&mut t, &dq, 1 | 0x8000_0000); // a feature never offered
        assert_eq!(r(&t, reg::STATUS) & status::FEATURES_OK, 0);
        assert!(!t.is_active());
    }

    #[test]
    fn notifications_before_driver_ok_are_ignored() {
        let (mut t, irqs) = transport();
        let mut dq = DriverQueue::new(16, 0x1000);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        dq.add(&t.mem, &[(0x8000, 8, true)]);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        w(&mut t, reg::QUEUE_NOTIFY, 7);
        assert!(dq.used(&t.mem).is_empty());
        assert_eq!(irqs.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_bad_queue_size_means_needs_reset() {
        let (mut t, irqs) = transport();
        let dq = DriverQueue::new(16, 0x1000);
        let mut bad = DriverQueue::new(16, 0x1000);
        bad.size = 12;
        bring_up(&mut t, &bad, 1);
        assert_ne!(r(&t, reg::STATUS) & status::NEEDS_RESET, 0);
        assert_eq!(r(&t, reg::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(irqs.load(Ordering::SeqCst), 1);
        // A reset and a correct setup bring it back.
        bring_up(&mut t, &dq, 1);
        assert!(t.is_active());
    }

    #[test]
    fn queue_registers_are_frozen_after_driver_ok() {
        let (mut t, _) = transport();
        let dq = DriverQueue::new(16, 0x1000);
        bring_up(&mut t, &dq, 1);
        w(&mut t, reg::QUEUE_NUM, 32);
        w(&mut t, reg::QUEUE_DESC_LOW, 0xdead_0000);
        assert_eq!(r(&t, reg::QUEUE_NUM), 16);
        assert_eq!(r(&t, reg::QUEUE_DESC_LOW), 0x1000);
        // Status bits cannot be taken away except by reset.
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert!(t.is_active());
    }

    #[test]
    fn a_new_instance_carries_on_from_the_saved_setup_and_the_used_ring() {
        let (mut t, irqs) = transport();
        let mut dq = DriverQueue::new(16, 0x1000);
        bring_up(&mut t, &dq, 1 | (RING_EVENT_IDX >> 32) as u32);
        for _ in 0..3 {
            dq.add(&t.mem, &[(0x8000, 8, true)]);
            w(&mut t, reg::QUEUE_NOTIFY, 0);
        }
        assert_eq!(dq.used(&t.mem).len(), 3);
        let words = t.save().to_words();
        // the driver adds two chains; the old instance dies after taking the first
        dq.add(&t.mem, &[(0x8000, 4, true)]);
        dq.add(&t.mem, &[(0x8100, 4, true)]);
        assert!(t.queues[0].pop(&t.mem).unwrap().is_some());
        let (mut new, new_irqs) = transport();
        new.mem = t.mem.clone();
        new.restore(&Saved::from_words(&words).expect("saved"))
            .unwrap();
        assert_eq!(new.save(), t.save());
        assert!(new.is_active());
        assert_eq!(
            r(&new, reg::INTERRUPT_STATUS),
            INT_USED_RING,
            "owed interrupt"
        );
        assert_eq!(new_irqs.load(Ordering::SeqCst), 1);
        // the next kick serves both chains, the one the old instance took included
        w(&mut new, reg::QUEUE_NOTIFY, 0);
        assert_eq!(dq.used(&new.mem), [(3, 4), (4, 4)]);
        assert_eq!(irqs.load(Ordering::SeqCst), 3);
        // a setup that was never finished stays unfinished; one that no longer fits
        // the device fails; a ring the driver moved out of memory means reset
        let (mut half, _) = transport();
        w(&mut half, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let saved = half.save();
        let (mut again, _) = transport();
        again.restore(&saved).unwrap();
        assert_eq!((again.save(), again.is_active()), (saved, false));
        let mut wrong = t.save();
        wrong.queues.push(SavedQueue::default());
        assert_eq!(
            again.restore(&wrong),
            Err(RestoreError::Queues {
                saved: 2,
                device: 1
            })
        );
        let mut gone = t.save();
        gone.queues[0].used_ring = 1 << 40;
        let (mut third, _) = transport();
        third.restore(&gone).unwrap();
        assert_ne!(r(&third, reg::STATUS) & status::NEEDS_RESET, 0);
    }

    #[test]
    fn saved_words_are_checked() {
        let (mut t, _) = transport();
        bring_up(&mut t, &DriverQueue::new(16, 0x1000), 1);
        let words = t.save().to_words();
        assert_eq!(Saved::from_words(&words), Some(t.save()));
        let mut longer = words.clone();
        longer.push(7);
        assert_eq!(
            Saved::from_words(&longer),
            Some(t.save()),
            "a page holds more"
        );
        for i in 0..words.len() {
            let mut bad = words.clone();
            bad[i] ^= 1 << 9;
            assert_eq!(Saved::from_words(&bad), None, "word {i} flipped");
        }
        assert_eq!(Saved::from_words(&words[..words.len() - 1]), None);
        assert_eq!(Saved::from_words(&[0; 512]), None, "a fresh page");
        assert_eq!(Saved::from_words(&[]), None);
        let mut huge = words.clone();
        huge[1] = u64::MAX;
        assert_eq!(Saved::from_words(&huge), None);
    }

    #[test]
    fn a_corrupt_ring_during_work_means_needs_reset() {
        let (mut t, _) = transport();
        let dq = DriverQueue::new(16, 0x1000);
        bring_up(&mut t, &dq, 1);
        dq.set_avail_idx(&t.mem, 100); // 100 entries "available" in a 16-entry ring
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_ne!(r(&t, reg::STATUS) & status::NEEDS_RESET, 0);
        assert!(!t.is_active(), "further kicks are ignored");
    }
}
