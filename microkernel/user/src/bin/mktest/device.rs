//! Hosted mode's device tasks: one task per virtio device of the guest, running the
//! same `devices::virtio` model as native mode, in its own address space.
//!
//! What a device task has, all of it mapped by the root into one window:
//! - the guest's RAM at the window's base (guest-physical 0): the only guest memory it
//!   can touch, through bounds-checked copies (`mkrt::mmio::Window`);
//! - the register page of VM0's own virtio device `i` (the vmm serves it with its
//!   native device code and backend: a file, the host's entropy) and a DMA buffer
//!   whose VM0-physical address it is told: it drives that device as a user-level
//!   driver (`mkrt::vdriver`), and the device's interrupt reaches it as IPC;
//! - nothing else: no other task's memory, no ports.
//!
//! The guest server routes the guest's exits in the device's window (guest-physical
//! `DEVICE_PHYS + 4 KiB * i`) to the task (`guest_route`). The task answers each MMIO
//! exit through the transport; a notification runs the queue there and then (the
//! backend request included: the vCPU waits, as with a device model in the vCPU
//! thread), and a used-ring interrupt goes back as a pulse of guest pin
//! `DEVICE_IRQ_BASE + i` in the reply.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use devices::virtio::blk::{BackendError, Block, BlockBackend, SECTOR_SIZE};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::rng::{EntropyError, EntropySource, Rng};
use devices::virtio::{device_type, GuestMemory, Interrupt, VirtioDevice};
use mkrt::abi::{guest, label, Fpage, Rights};
use mkrt::mmio::{Regs, Window};
use mkrt::msg::{reply_wait, wait, Msg};
use mkrt::println;
use mkrt::vdriver::{self, Driver};

use crate::{booted_with, park, report};

/// The window the root maps everything into, and where each part lands in it.
pub const WINDOW: u64 = 0xa000_0000;
pub const WINDOW_LOG2: u8 = 29;
/// Guest RAM from offset 0, at most this much.
pub const MAX_RAM: u64 = 0x1000_0000;
/// VM0's device registers.
pub const REGS_AT: u64 = 0x1000_0000;
/// The DMA buffer: `2^DMA_LOG2` bytes.
pub const DMA_AT: u64 = 0x1010_0000;
pub const DMA_LOG2: u8 = 17;
/// Label of the root's question for the task's counts (the reply: exits as IPC,
/// queue notifications among them, requests to VM0's device).
pub const STATS: u64 = 0x57a7;

/// The task's report to the root after setting up (word 0).
pub mod ready {
    pub const OK: u64 = 0;
    pub const NO_DEVICE: u64 = 1;
    pub const UNSUPPORTED: u64 = 2;
}

/// The model raised its interrupt since the last reply.
static RAISED: AtomicBool = AtomicBool::new(false);
/// Requests to VM0's device (the backend).
static REQUESTS: AtomicU64 = AtomicU64::new(0);

struct Raise;

impl Interrupt for Raise {
    fn trigger(&self) {
        RAISED.store(true, Ordering::SeqCst);
    }
}

/// virtio-blk request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// A disk: VM0's virtio-blk device, one request at a time through the DMA buffer.
struct Vm0Disk {
    drv: Driver,
    bytes: u64,
}

impl Vm0Disk {
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        len: u32,
        into: bool,
    ) -> Result<u32, BackendError> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        let dma = self.drv.dma();
        dma.write(self.drv.phys(vdriver::HEADER), &h).map_err(|_| BackendError::Io)?;
        dma.write(self.drv.phys(vdriver::STATUS), &[0xff]).map_err(|_| BackendError::Io)?;
        let data = if kind == T_GET_ID { vdriver::SMALL } else { vdriver::DATA };
        let bufs = [(vdriver::HEADER, 16, false), (data, len, into), (vdriver::STATUS, 1, true)];
        // a request without data (flush) is header and status only
        let chain: &[_] = if len == 0 { &[bufs[0], bufs[2]] } else { &bufs };
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        let used = self.drv.run(chain).map_err(|_| BackendError::Io)?;
        let mut status = [0xffu8];
        let at = self.drv.phys(vdriver::STATUS);
        self.drv.dma().read(at, &mut status).map_err(|_| BackendError::Io)?;
        match status[0] {
            0 => Ok(used),
            2 => Err(BackendError::Unsupported),
            _ => Err(BackendError::Io),
        }
    }

    fn id(&mut self) -> [u8; 20] {
        let mut id = [0u8; 20];
        if self.request(T_GET_ID, 0, 20, true).is_ok() {
            let _ = self.drv.dma().read(self.drv.phys(vdriver::SMALL), &mut id);
        }
        id
    }

    fn check(offset: u64, len: usize) -> Result<u64, BackendError> {
        if !offset.is_multiple_of(SECTOR_SIZE) || !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(BackendError::Io);
        }
        Ok(offset / SECTOR_SIZE)
    }
}

impl BlockBackend for Vm0Disk {
    fn size(&self) -> u64 {
        self.bytes
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let mut sector = Self::check(offset, buf.len())?;
        for chunk in buf.chunks_mut(vdriver::DATA_LEN) {
            self.request(T_IN, sector, chunk.len() as u32, true)?;
            let at = self.drv.phys(vdriver::DATA);
            self.drv.dma().read(at, chunk).map_err(|_| BackendError::Io)?;
            sector += chunk.len() as u64 / SECTOR_SIZE;
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        let mut sector = Self::check(offset, buf.len())?;
        for chunk in buf.chunks(vdriver::DATA_LEN) {
            let at = self.drv.phys(vdriver::DATA);
            self.drv.dma().write(at, chunk).map_err(|_| BackendError::Io)?;
            self.request(T_OUT, sector, chunk.len() as u32, false)?;
            sector += chunk.len() as u64 / SECTOR_SIZE;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BackendError> {
        self.request(T_FLUSH, 0, 0, false).map(|_| ())
    }
}

/// Entropy: VM0's virtio-rng device.
struct Vm0Entropy(Driver);

impl EntropySource for Vm0Entropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(vdriver::DATA_LEN) as u32;
            REQUESTS.fetch_add(1, Ordering::Relaxed);
            let n = self.0.run(&[(vdriver::DATA, want, true)]).map_err(|_| EntropyError)?;
            let n = (n.min(want) as usize).min(buf.len() - done);
            if n == 0 {
                return Err(EntropyError);
            }
            let at = self.0.phys(vdriver::DATA);
            self.0.dma().read(at, &mut buf[done..done + n]).map_err(|_| EntropyError)?;
            done += n;
        }
        Ok(())
    }
}

/// The task. Boot message: `[index, VM0 line, guest pin, RAM bytes, DMA physical]`.
pub extern "C" fn task() -> ! {
    let window = Fpage::new(WINDOW, WINDOW_LOG2, Rights::ALL).expect("aligned window");
    let (root, boot) = booted_with(window);
    let [index, line, pin, ram, dma_phys] = [0, 1, 2, 3, 4].map(|i| boot.word(i));
    if ram > MAX_RAM {
        report(root, &[ready::NO_DEVICE, 0]);
        park()
    }
    // SAFETY: the root mapped these parts of the window before the boot message:
    // the register page, the DMA run and the guest's RAM; nothing else refers to them.
    let (regs, dma, mem) = unsafe {
        (
            Regs::at(WINDOW + REGS_AT),
            Window::new(WINDOW + DMA_AT, 1 << DMA_LOG2, dma_phys),
            Window::new(WINDOW, ram, 0),
        )
    };
    let accept = (devices::virtio::blk::feature::RO | devices::virtio::blk::feature::FLUSH) as u32;
    let drv = match Driver::new(regs, dma, line as u16, accept) {
        Ok(d) => d,
        Err(e) => {
            println!("device task {index}: VM0's device: {e:?}");
            report(root, &[ready::NO_DEVICE, 0]);
            park()
        }
    };
    let base = mkrt::bootinfo::layout::DEVICE_PHYS + index * 4096;
    match drv.device_id {
        device_type::BLOCK => {
            let read_only = u64::from(drv.features) & devices::virtio::blk::feature::RO != 0;
            let bytes = drv.config_u64(0) * SECTOR_SIZE;
            let mut disk = Vm0Disk { drv, bytes };
            let id = disk.id();
            let len = id.iter().position(|&b| b == 0).unwrap_or(id.len());
            let model = Block::new(disk, read_only, &id[..len]);
            report(root, &[ready::OK, device_type::BLOCK.into()]);
            serve(MmioTransport::new(model, mem, Box::new(Raise)), base, pin)
        }
        device_type::RNG => {
            let model = Rng::new(Vm0Entropy(drv));
            report(root, &[ready::OK, device_type::RNG.into()]);
            serve(MmioTransport::new(model, mem, Box::new(Raise)), base, pin)
        }
        other => {
            println!("device task {index}: VM0 device type {other} has no device task");
            report(root, &[ready::UNSUPPORTED, other.into()]);
            park()
        }
    }
}

/// Answer the guest's exits in the device's window, forever.
fn serve<D: VirtioDevice, M: GuestMemory>(mut t: MmioTransport<D, M>, base: u64, pin: u64) -> ! {
    let (mut from, mut m) = wait();
    let (mut exits, mut notifies) = (0u64, 0u64);
    loop {
        if m.label() == STATS {
            let mut r = Msg::new(STATS, &[exits, notifies, REQUESTS.load(Ordering::Relaxed)]);
            (from, m) = reply_wait(from, &mut r).map(|f| (f, r)).unwrap_or_else(|_| wait());
            continue;
        }
        if m.label() != label::GUEST_EXIT {
            (from, m) = wait();
            continue;
        }
        exits += 1;
        let (kind, size) = (m.word(0) & 0xff, ((m.word(0) >> 8) & 0xff) as usize);
        let size = size.clamp(1, 8);
        let offset = m.word(1).wrapping_sub(base);
        let value = match kind {
            guest::MMIO_READ if offset < 4096 => {
                let mut b = [0u8; 8];
                t.read(offset, &mut b[..size]);
                u64::from_le_bytes(b)
            }
            guest::MMIO_WRITE if offset < 4096 => {
                notifies += u64::from(offset == devices::virtio::mmio::reg::QUEUE_NOTIFY);
                t.write(offset, &m.word(2).to_le_bytes()[..size]);
                0
            }
            _ => u64::MAX,
        };
        let pulse = if RAISED.swap(false, Ordering::SeqCst) { 1 << pin } else { 0 };
        let mut reply = Msg::new(0, &[value, pulse]);
        (from, m) = match reply_wait(from, &mut reply) {
            Ok(f) => (f, reply),
            Err(_) => wait(),
        };
    }
}

/// Why a device could not be set up, for the root's message.
pub fn why(code: u64) -> &'static str {
    match code {
        ready::NO_DEVICE => "VM0's device did not answer as virtio-mmio",
        ready::UNSUPPORTED => "no device task for this device type",
        _ => "unknown",
    }
}
