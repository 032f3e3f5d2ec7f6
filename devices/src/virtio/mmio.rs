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
            let event_idx = self.driver_features & RING_EVENT_IDX != 0;
            let mem: &dyn GuestMemory = &self.mem;
            let mut valid = true;
            for q in self.queues.iter_mut().filter(|q| q.ready) {
                q.set_event_idx(event_idx);
                valid &= q.validate(mem).is_ok();
            }
            self.status = v;
            if !valid {
                self.needs_reset();
                return;
            }
            self.device.activate(self.driver_features);
            return;
        }
        self.status = v;
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

    fn needs_reset(&mut self) {
        self.status |= status::NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.isr.fetch_or(INT_CONFIG, Ordering::SeqCst);
        self.interrupt.trigger();
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
