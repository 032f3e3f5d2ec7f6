//! Hosted mode's device tasks: one task per virtio device of the guest, running the
//! same `devices::virtio` model as native mode, in its own address space.
//!
//! What a device task has, all of it mapped by the root into one window:
//! - the guest's RAM at the window's base (guest-physical 0): the only guest memory it
//!   can touch, through bounds-checked copies (`mkrt::mmio::Window`);
//! - the register page of VM0's own virtio device `i` (the vmm serves it with its
//!   native device code and backend: a file, a tap, the host's Unix sockets for vsock,
//!   the host's entropy) and a DMA buffer
//!   whose VM0-physical address it is told: it drives that device as a user-level
//!   driver (`mkrt::vdriver`), and the device's interrupt reaches it as IPC;
//! - nothing else: no other task's memory, no ports.
//!
//! The guest server routes the guest's exits in the device's window (guest-physical
//! `DEVICE_PHYS + 4 KiB * i`) to the task (`guest_route`). The task answers each MMIO
//! exit through the transport; a notification runs the queue there and then (the
//! backend request included: the vCPU waits, as with a device model in the vCPU
//! thread), and a used-ring interrupt goes back as a pulse of guest pin
//! `DEVICE_IRQ_BASE + i` in the reply. What arrives while the guest runs (a frame
//! from VM0's network device, announced by its interrupt) is moved into the guest's
//! receive queue by the task, which raises the guest's pin with `guest_interrupt`.
//!
//! With eventfd pairing (the default; `bootinfo::layout::NOTIFY_IRQ_BASE`) the guest's
//! queue notifications do not exit: KVM turns them into an interrupt of VM0 that
//! reaches the task as IPC from its notification line, and the task raises the guest's
//! pin by writing its doorbell page, which KVM turns into the guest's interrupt. Only
//! the other register accesses (interrupt status and acknowledgement, setup) are exits.
//!
//! A device task can die (a fault nobody resolves) and be restarted by the root
//! (`hosted`): the driver's setup of the transport (`MmioTransport::save`) lives in a
//! state page the root keeps and maps into each instance; a restarted instance
//! restores it, its queues carry on where their used rings say, and the guest exit the
//! old instance died on reaches the new one (the kernel re-raises an unanswered exit
//! whose handler is deleted). With `vmm --test-device-faults` the guest can make the
//! task crash on purpose, through register `FAULT_REG` of the device's window.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use devices::virtio::blk::{BackendError, Block, BlockBackend, SECTOR_SIZE};
use devices::virtio::mmio::{MmioTransport, Saved};
use devices::virtio::net::{self, Net, NetBackend, NetError};
use devices::virtio::rng::{EntropyError, EntropySource, Rng};
use devices::virtio::vsock::{self, PacketHeader, Vsock, VsockBackend};
use devices::virtio::{device_type, GuestMemory, Interrupt, VirtioDevice};
use mkrt::abi::{guest, irq_control, label, Fpage, Rights, ThreadId};
use mkrt::mmio::{Regs, Window};
use mkrt::msg::{reply_wait, wait, Msg};
use mkrt::vdriver::{self, Driver, DriverError, Irq};
use mkrt::{println, sys};

use crate::{booted_with, park, report};

/// The window the root maps everything into, and where each part lands in it.
pub const WINDOW: u64 = 0xa000_0000;
pub const WINDOW_LOG2: u8 = 29;
/// Guest RAM from offset 0, at most this much.
pub const MAX_RAM: u64 = 0x1000_0000;
/// VM0's device registers.
pub const REGS_AT: u64 = 0x1000_0000;
/// The state page: the transport's saved setup, kept by the root across restarts.
pub const STATE_AT: u64 = 0x1001_0000;
/// The doorbell page (eventfd pairing): a write raises the guest's pin.
pub const DOORBELL_AT: u64 = 0x1002_0000;
/// The DMA buffer: `2^DMA_LOG2` bytes.
pub const DMA_AT: u64 = 0x1010_0000;
pub const DMA_LOG2: u8 = 17;
/// Label of the root's question for the task's counts (the reply: exits as IPC, queue
/// notifications, the notifications that came as interrupts (paired), requests to
/// VM0's device, guest interrupts raised outside exit replies: doorbell or
/// `guest_interrupt`).
pub const STATS: u64 = 0x57a7;

/// Boot message flags (word 5).
pub mod boot {
    /// A restart: carry on from the state page.
    pub const RESTARTED: u64 = 1;
    /// Honour `FAULT_REG` (`vmm --test-device-faults`).
    pub const FAULTS: u64 = 2;
    /// Eventfd pairing: notifications arrive on line `NOTIFY_IRQ_BASE + index`, and
    /// the doorbell page raises the guest's pin.
    pub const PAIRED: u64 = 4;
}

/// Test-only register in the device's window (past any device's configuration space):
/// a write of a `point` arms a crash there; without `boot::FAULTS` it is ignored.
pub const FAULT_REG: u64 = 0xf00;

/// Where an armed crash happens: in the handling of the next queue notification ...
pub mod point {
    /// ... before the model sees it (the new instance gets the same notification);
    pub const BEFORE: u64 = 1;
    /// ... in the backend, after VM0's device did a request (the new instance does it
    /// again: the guest was not told it was done);
    pub const BACKEND: u64 = 2;
    /// ... after the model used the buffers, before the exit is answered (the guest
    /// was not interrupted: the new instance owes it the interrupt).
    pub const AFTER: u64 = 3;
    /// Added to a point: crash with an invalid-opcode exception (which goes to the
    /// task's supervisor) instead of a page fault (which goes to its pager).
    pub const EXCEPTION: u64 = 16;
}

/// The armed crash point, 0 for none.
static ARMED: AtomicU64 = AtomicU64::new(0);

/// Crash here if `at` is armed: the test-only fault, a load from an address nothing
/// maps, or `ud2`.
fn crash_if(at: u64) {
    let armed = ARMED.load(Ordering::Relaxed);
    if armed & !point::EXCEPTION != at {
        return;
    }
    println!("device task: injected fault at point {armed}");
    if armed & point::EXCEPTION != 0 {
        // SAFETY: raises #UD; the kernel sends it to the supervisor, which deletes this
        // task: execution never continues past it.
        unsafe { core::arch::asm!("ud2", options(nostack)) };
    } else {
        // SAFETY: a load the page tables refuse; the pager cannot resolve it and
        // reports it to the supervisor, which deletes this task: execution never
        // continues past it, and no Rust reference is involved.
        unsafe {
            core::arch::asm!("mov {0}, qword ptr [{1}]", out(reg) _, in(reg) UNMAPPED, options(nostack))
        };
    }
}

/// Inside the task's window, where the root maps nothing.
const UNMAPPED: u64 = WINDOW + 0x1ff0_0000;

/// The task's report to the root after setting up (word 0).
pub mod ready {
    pub const OK: u64 = 0;
    pub const NO_DEVICE: u64 = 1;
    pub const UNSUPPORTED: u64 = 2;
}

/// The model raised its interrupt since the last reply.
static RAISED: AtomicBool = AtomicBool::new(false);
/// Requests to VM0's device (the backend): disk requests, entropy requests, frames
/// sent and frames received.
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
        crash_if(point::BACKEND);
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
            crash_if(point::BACKEND);
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

/// A network interface: VM0's virtio-net device. Receive buffers stay offered on its
/// queue 0 and are taken back as it fills them; a frame to send goes through one
/// transmit buffer on queue 1, one at a time. VM0's device is asked for the transmit
/// offloads the guest may use (checksum, TSO) but no receive offloads: it delivers
/// plain frames of at most the tap's MTU, which the guest always accepts.
struct Vm0Net {
    drv: Driver,
    rx: RxRing,
}

/// Receive buffers kept offered on queue 0 of VM0's device (network, vsock): buffer
/// `i` is descriptor `i`, `len` bytes at `at + i * len` in the DMA window, offered
/// again as soon as what the device put into it has been taken out.
struct RxRing {
    at: u64,
    len: u32,
    /// Buffers were offered again since the last notification.
    refill: bool,
}

impl RxRing {
    const Q: usize = 0;

    /// Offer every buffer to `drv`'s device. They must lie past `free` (where the
    /// caller's own buffers end) and inside the DMA window.
    fn start(drv: &mut Driver, at: u64, len: u32, free: u64) -> Result<Self, DriverError> {
        let end = at + u64::from(vdriver::QUEUE_SIZE) * u64::from(len);
        if free > at || end > drv.dma().len() {
            return Err(DriverError::Dma);
        }
        let mut ring = Self { at, len, refill: false };
        for i in 0..vdriver::QUEUE_SIZE {
            ring.give_back(drv, i)?;
        }
        ring.kick(drv);
        Ok(ring)
    }

    /// Buffer `i`'s offset in the DMA window.
    fn offset(&self, i: u16) -> u64 {
        self.at + u64::from(i) * u64::from(self.len)
    }

    /// Offer buffer `i` (descriptor `i`) to the device again.
    fn give_back(&mut self, drv: &mut Driver, i: u16) -> Result<(), DriverError> {
        drv.offer(Self::Q, i, &[(self.offset(i), self.len, true)])?;
        self.refill = true;
        Ok(())
    }

    /// Tell the device about the buffers offered since the last time.
    fn kick(&mut self, drv: &Driver) {
        if core::mem::take(&mut self.refill) {
            drv.notify(Self::Q);
        }
    }
}

impl Vm0Net {
    const TX: usize = 1;
    /// The transmit buffer: a whole frame as the guest's device may send it.
    const TX_AT: u64 = vdriver::DATA;
    const TX_LEN: usize = net::MAX_FRAME;
    /// Receive buffer `i` (a frame of a 1500-byte MTU and its header fit).
    const RX_AT: u64 = 0x1_3000;
    const RX_LEN: u32 = 0x800;
    /// Features asked of VM0's device.
    const ACCEPT: u64 = net::feature::MAC
        | net::feature::STATUS
        | net::feature::CSUM
        | net::feature::HOST_TSO4
        | net::feature::HOST_TSO6
        | net::feature::HOST_ECN;

    fn new(mut drv: Driver) -> Result<Self, DriverError> {
        let tx_end = Self::TX_AT + Self::TX_LEN as u64;
        let rx = RxRing::start(&mut drv, Self::RX_AT, Self::RX_LEN, tx_end)?;
        Ok(Self { drv, rx })
    }

    fn mac(&self) -> [u8; 6] {
        let c = self.drv.config_u64(0).to_le_bytes();
        [c[0], c[1], c[2], c[3], c[4], c[5]]
    }
}

/// `EIO`, for the device's counters: VM0's device failed us.
const EIO: i32 = 5;

impl NetBackend for Vm0Net {
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        if frame.len() > Self::TX_LEN {
            return Err(NetError::Io(EIO));
        }
        let at = self.drv.phys(Self::TX_AT);
        self.drv.dma().write(at, frame).map_err(|_| NetError::Io(EIO))?;
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        let buf = (Self::TX_AT, frame.len() as u32, false);
        self.drv.run_on(Self::TX, &[buf]).map_err(|_| NetError::Io(EIO))?;
        crash_if(point::BACKEND);
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        let Some((i, len)) = self.drv.used(RxRing::Q).map_err(|_| NetError::Io(EIO))? else {
            self.rx.kick(&self.drv);
            return Ok(None);
        };
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        let n = (len.min(Self::RX_LEN) as usize).min(buf.len());
        let at = self.drv.phys(self.rx.offset(i));
        let read = self.drv.dma().read(at, &mut buf[..n]);
        // the buffer goes back to VM0's device whatever became of its frame
        self.rx.give_back(&mut self.drv, i).map_err(|_| NetError::Io(EIO))?;
        read.map_err(|_| NetError::Io(EIO))?;
        Ok(Some(n))
    }

    fn set_offloads(&mut self, _guest_features: u64) -> Result<(), NetError> {
        // VM0's device produces no offloaded frames (ACCEPT has no GUEST_* bit), which
        // any guest accepts.
        Ok(())
    }
}

/// A vsock device: VM0's virtio-vsock, whose backend (the vmm's) bridges to the host's
/// Unix sockets. Packets pass through unchanged: the guest's model has checked the
/// guest's (its CID, the host as destination), and VM0's device checks them again for
/// the same CID. Receive buffers stay offered on VM0's queue 0, as for the network; a
/// packet whose payload does not fit the guest's receive buffer is handed over in parts
/// (only data packets carry payload, and a stream may be split anywhere).
struct Vm0Vsock {
    drv: Driver,
    rx: RxRing,
    /// The packet being handed over: header, its receive buffer, payload length, bytes
    /// handed over so far.
    part: Option<(PacketHeader, u16, usize, usize)>,
}

impl Vm0Vsock {
    const TX: usize = 1;
    /// The transmit buffer: header and the largest payload.
    const TX_AT: u64 = vdriver::DATA;
    const TX_LEN: usize = vsock::HDR_LEN + vsock::MAX_PAYLOAD;
    /// Receive buffer `i`: header and 4 KiB of payload (what Linux offers a guest too).
    const RX_AT: u64 = 0x1_3000;
    const RX_LEN: u32 = 0x1100;

    fn new(mut drv: Driver) -> Result<Self, DriverError> {
        let tx_end = Self::TX_AT + Self::TX_LEN as u64;
        let rx = RxRing::start(&mut drv, Self::RX_AT, Self::RX_LEN, tx_end)?;
        Ok(Self { drv, rx, part: None })
    }

    /// The next packet from VM0's device: header, buffer, payload length.
    fn next(&mut self) -> Option<(PacketHeader, u16, usize)> {
        let (i, used) = self.drv.used(RxRing::Q).ok()??;
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        let mut raw = [0u8; vsock::HDR_LEN];
        let at = self.drv.phys(self.rx.offset(i));
        if (used as usize) < raw.len() || self.drv.dma().read(at, &mut raw).is_err() {
            // nothing usable in it: the buffer goes back
            let _ = self.rx.give_back(&mut self.drv, i);
            return None;
        }
        let hdr = PacketHeader::from_bytes(&raw);
        let room = (Self::RX_LEN as usize - raw.len()).min(used as usize - raw.len());
        Some((hdr, i, (hdr.len as usize).min(room)))
    }
}

impl VsockBackend for Vm0Vsock {
    fn send_pkt(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        let len = vsock::HDR_LEN + payload.len();
        if len > Self::TX_LEN {
            return;
        }
        let at = self.drv.phys(Self::TX_AT);
        let dma = self.drv.dma();
        let written = dma
            .write(at, &hdr.to_bytes())
            .and_then(|()| dma.write(at + vsock::HDR_LEN as u64, payload));
        if written.is_ok() {
            REQUESTS.fetch_add(1, Ordering::Relaxed);
            // a packet VM0's device did not take is lost, as on a wire: the guest's
            // stream then stalls or is reset by the host side
            if self.drv.run_on(Self::TX, &[(Self::TX_AT, len as u32, false)]).is_ok() {
                crash_if(point::BACKEND);
            }
        }
    }

    fn recv_pkt(&mut self, hdr: &mut PacketHeader, payload: &mut [u8]) -> Option<usize> {
        let (h, i, len, done) = match self.part.take() {
            Some(p) => p,
            None => match self.next() {
                Some((h, i, len)) => (h, i, len, 0),
                None => {
                    self.rx.kick(&self.drv);
                    return None;
                }
            },
        };
        let n = (len - done).min(payload.len());
        let at = self.drv.phys(self.rx.offset(i)) + (vsock::HDR_LEN + done) as u64;
        let read = self.drv.dma().read(at, &mut payload[..n]);
        *hdr = h;
        if done + n < len && read.is_ok() {
            self.part = Some((h, i, len, done + n));
        } else {
            let _ = self.rx.give_back(&mut self.drv, i);
        }
        read.ok().map(|()| n)
    }

    fn has_pending(&self) -> bool {
        self.part.is_some() || self.drv.has_used(RxRing::Q)
    }
}

/// The task. Boot message: `[index, VM0 line, guest pin, RAM bytes, DMA physical,
/// boot flags]`.
pub extern "C" fn task() -> ! {
    let window = Fpage::new(WINDOW, WINDOW_LOG2, Rights::ALL).expect("aligned window");
    let (root, boot_msg) = booted_with(window);
    let [index, line, pin, ram, dma_phys, flags] = [0, 1, 2, 3, 4, 5].map(|i| boot_msg.word(i));
    if ram > MAX_RAM {
        report(root, &[ready::NO_DEVICE, 0]);
        park()
    }
    // SAFETY: the root mapped these parts of the window before the boot message:
    // the register page, the state page, the DMA run and the guest's RAM; nothing
    // else in this task refers to them.
    let (regs, state, dma, mem) = unsafe {
        (
            Regs::at(WINDOW + REGS_AT),
            Window::new(WINDOW + STATE_AT, 4096, 0),
            Window::new(WINDOW + DMA_AT, 1 << DMA_LOG2, dma_phys),
            Window::new(WINDOW, ram, 0),
        )
    };
    let paired = (flags & boot::PAIRED != 0).then(|| {
        // SAFETY: with `PAIRED` the root mapped the doorbell page before the boot
        // message; writes to it are all this task does with it.
        let bell = unsafe { Regs::at(WINDOW + DOORBELL_AT) };
        (bell, mkrt::bootinfo::layout::NOTIFY_IRQ_BASE + index as u16)
    });
    let base = mkrt::bootinfo::layout::DEVICE_PHYS + index * 4096;
    let how = Serve { index, base, pin, state, flags, paired };
    // what to ask of VM0's device and how many queues it has, by its type (read before
    // the driver resets it): a network interface two, the others one
    let (accept, queues) = match regs.read32(devices::virtio::mmio::reg::DEVICE_ID) {
        device_type::NET => (Vm0Net::ACCEPT, 2),
        // rx and tx; the event queue stays unused (as in the guest's model)
        device_type::VSOCK => (0, 2),
        _ => (devices::virtio::blk::feature::RO | devices::virtio::blk::feature::FLUSH, 1),
    };
    let drv = match Driver::new(regs, dma, line as u16, accept as u32, queues) {
        Ok(d) => d,
        Err(e) => {
            println!("device task {index}: VM0's device: {e:?}");
            report(root, &[ready::NO_DEVICE, 0]);
            park()
        }
    };
    let vm0 = drv.irq();
    match drv.device_id {
        device_type::BLOCK => {
            let read_only = u64::from(drv.features) & devices::virtio::blk::feature::RO != 0;
            let bytes = drv.config_u64(0) * SECTOR_SIZE;
            let mut disk = Vm0Disk { drv, bytes };
            let id = disk.id();
            let len = id.iter().position(|&b| b == 0).unwrap_or(id.len());
            let model = Block::new(disk, read_only, &id[..len]);
            report(root, &[ready::OK, device_type::BLOCK.into()]);
            serve(MmioTransport::new(model, mem, Box::new(Raise)), how, vm0)
        }
        device_type::NET => {
            let Ok(wire) = Vm0Net::new(drv) else {
                println!("device task {index}: VM0's network device refused its buffers");
                report(root, &[ready::NO_DEVICE, 0]);
                park()
            };
            let mac = wire.mac();
            let model = Net::new(wire, mac);
            report(root, &[ready::OK, device_type::NET.into()]);
            serve(MmioTransport::new(model, mem, Box::new(Raise)), how, vm0)
        }
        device_type::VSOCK => {
            let cid = drv.config_u64(0);
            let Ok(wire) = Vm0Vsock::new(drv) else {
                println!("device task {index}: VM0's vsock device refused its buffers");
                report(root, &[ready::NO_DEVICE, 0]);
                park()
            };
            let model = Vsock::new(cid, wire);
            report(root, &[ready::OK, device_type::VSOCK.into()]);
            serve(MmioTransport::new(model, mem, Box::new(Raise)), how, vm0)
        }
        device_type::RNG => {
            let model = Rng::new(Vm0Entropy(drv));
            report(root, &[ready::OK, device_type::RNG.into()]);
            serve(MmioTransport::new(model, mem, Box::new(Raise)), how, vm0)
        }
        other => {
            println!("device task {index}: VM0 device type {other} has no device task");
            report(root, &[ready::UNSUPPORTED, other.into()]);
            park()
        }
    }
}

/// What `serve` needs besides the transport.
struct Serve {
    index: u64,
    /// Guest-physical address of the device's window.
    base: u64,
    /// The guest's IOAPIC pin for the device.
    pin: u64,
    /// The state page.
    state: Window,
    /// Boot flags (`boot::*`).
    flags: u64,
    /// Eventfd pairing: the doorbell and the notification line.
    paired: Option<(Regs, u16)>,
}

impl Serve {
    /// The saved setup in the state page, if there is a valid one.
    fn load(&self) -> Option<Saved> {
        let mut words = [0u64; 512];
        let mut bytes = [0u8; 8];
        for (i, w) in words.iter_mut().enumerate() {
            self.state.read(8 * i as u64, &mut bytes).ok()?;
            *w = u64::from_le_bytes(bytes);
        }
        Saved::from_words(&words)
    }

    /// Keep `saved` in the state page (one page holds any device's).
    fn store(&self, saved: &Saved) {
        for (i, w) in saved.to_words().iter().take(512).enumerate() {
            let _ = self.state.write(8 * i as u64, &w.to_le_bytes());
        }
    }
}

/// Answer the guest's exits in the device's window, its notifications (paired) and
/// VM0's device's interrupts, forever.
///
/// An exit is answered in the reply (the value read, and the guest pin to pulse if the
/// model raised its interrupt meanwhile). VM0's interrupt is news from the backend (a
/// frame arrived): acknowledge it, let the model take what it can, and if that raised
/// the guest's interrupt, raise it now — by the doorbell (paired) or with
/// `guest_interrupt` — since there is no exit to answer. A paired notification is the
/// same: unmask the line first (a notification after that interrupts again; one before
/// it is in the rings looked at next), run every queue (`notified`), raise by the
/// doorbell.
fn serve<D: VirtioDevice, M: GuestMemory>(mut t: MmioTransport<D, M>, how: Serve, vm0: Irq) -> ! {
    let (base, pin) = (how.base, how.pin);
    if how.flags & boot::RESTARTED != 0 {
        // carry on; with no valid state the driver is told to reset the device
        match how.load().map(|s| t.restore(&s)) {
            Some(Ok(())) => println!("device task {}: restarted, setup restored", how.index),
            Some(Err(e)) => {
                println!("device task {}: restarted, state unusable: {e}", how.index);
                t.fail();
            }
            None => {
                println!("device task {}: restarted, no saved state", how.index);
                t.fail();
            }
        }
    }
    let mut saved = t.save();
    how.store(&saved);
    let queues = t.device().queue_max_sizes().len();
    let (mut exits, mut notifies, mut by_irq, mut interrupts) = (0u64, 0u64, 0u64, 0u64);
    let mut vcpu = None;
    // An interrupt that fired between the root's attach and this point was swallowed
    // by the wait for the boot message and left its line masked: unmask both lines,
    // then look at everything once — VM0's device, and (after a restart) what the
    // guest added while no task listened.
    vm0.acknowledge();
    if let Some((_, line)) = how.paired {
        let _ = sys::irq_control(irq_control::ACK, line.into(), ThreadId::NIL);
    }
    for q in 0..queues {
        t.notify(q);
    }
    t.backend_ready();
    interrupts += raise(&how, vcpu);
    let (mut from, mut m) = wait();
    loop {
        if m.label() == label::INTERRUPT && from == ThreadId::irq(vm0.line) {
            vm0.acknowledge();
            t.backend_ready();
            interrupts += raise(&how, vcpu);
            keep(&how, &t, &mut saved);
            (from, m) = wait();
            continue;
        }
        if let Some((_, line)) = how.paired.filter(|&(_, l)| from == ThreadId::irq(l)) {
            let _ = sys::irq_control(irq_control::ACK, line.into(), ThreadId::NIL);
            notifies += 1;
            by_irq += 1;
            notified(&mut t, |t| (0..queues).for_each(|q| t.notify(q)));
            interrupts += raise(&how, vcpu);
            keep(&how, &t, &mut saved);
            (from, m) = wait();
            continue;
        }
        if m.label() == STATS {
            let requests = REQUESTS.load(Ordering::Relaxed);
            let counts = [exits, notifies, by_irq, requests, interrupts];
            let mut r = Msg::new(STATS, &counts);
            (from, m) = reply_wait(from, &mut r).map(|f| (f, r)).unwrap_or_else(|_| wait());
            continue;
        }
        if m.label() != label::GUEST_EXIT {
            (from, m) = wait();
            continue;
        }
        vcpu = Some(from);
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
            guest::MMIO_WRITE if offset == FAULT_REG && how.flags & boot::FAULTS != 0 => {
                println!("device task {}: crash armed at point {}", how.index, m.word(2));
                ARMED.store(m.word(2), Ordering::Relaxed);
                0
            }
            guest::MMIO_WRITE if offset == devices::virtio::mmio::reg::QUEUE_NOTIFY => {
                notifies += 1;
                notified(&mut t, |t| t.write(offset, &m.word(2).to_le_bytes()[..size]));
                0
            }
            guest::MMIO_WRITE if offset < 4096 => {
                t.write(offset, &m.word(2).to_le_bytes()[..size]);
                0
            }
            _ => u64::MAX,
        };
        // only a write can change the driver's setup
        if kind == guest::MMIO_WRITE {
            keep(&how, &t, &mut saved);
        }
        let pulse = if RAISED.swap(false, Ordering::SeqCst) { 1 << pin } else { 0 };
        let mut reply = Msg::new(0, &[value, pulse]);
        (from, m) = match reply_wait(from, &mut reply) {
            Ok(f) => (f, reply),
            Err(_) => wait(),
        };
    }
}

/// A queue notification, however it came (an exit, or the paired line's interrupt):
/// `kick` hands it to the transport; then the model is asked for backend input too (a
/// transmit may have consumed VM0's interrupt that announced a received frame). The
/// test-only crash points `BEFORE` and `AFTER` are around it.
fn notified<D: VirtioDevice, M: GuestMemory>(
    t: &mut MmioTransport<D, M>,
    kick: impl FnOnce(&mut MmioTransport<D, M>),
) {
    crash_if(point::BEFORE);
    kick(t);
    t.backend_ready();
    crash_if(point::AFTER);
}

/// Keep the driver's setup where a restarted instance finds it, if it changed since
/// `saved` (register writes; a device that failed and asks for a reset).
fn keep<D: VirtioDevice, M: GuestMemory>(how: &Serve, t: &MmioTransport<D, M>, saved: &mut Saved) {
    let now = t.save();
    if now != *saved {
        how.store(&now);
        *saved = now;
    }
}

/// Raise the guest's pin now if the model asked for it: by the doorbell, or by system
/// call once the vCPU is known (before that, the first exit's reply carries it).
/// Returns 1 if it did.
fn raise(how: &Serve, vcpu: Option<ThreadId>) -> u64 {
    match (how.paired, vcpu) {
        (Some((bell, _)), _) if RAISED.swap(false, Ordering::SeqCst) => bell.write32(0, 1),
        (None, Some(v)) if RAISED.swap(false, Ordering::SeqCst) => {
            let _ = sys::guest_interrupt(v, 1 << how.pin);
        }
        _ => return 0,
    }
    1
}

/// Why a device could not be set up, for the root's message.
pub fn why(code: u64) -> &'static str {
    match code {
        ready::NO_DEVICE => "VM0's device did not answer as virtio-mmio",
        ready::UNSUPPORTED => "no device task for this device type",
        _ => "unknown",
    }
}
