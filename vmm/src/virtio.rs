//! Native mode's virtio devices: what the command line asks for, opening the backends
//! before the guest starts, the virtio-mmio bus the vCPUs use, and the event loop.
//!
//! Data path: the guest's `QueueNotify` write hits a KVM ioeventfd (no exit to the
//! vmm); the event-loop thread wakes on it, runs the device's queue, and raises the
//! guest's interrupt through a KVM irqfd. vCPU threads only handle register accesses
//! (setup, interrupt status/ack), and interrupt status/ack never wait for a device
//! that is busy with I/O: they touch an atomic shared with the transport.
//!
//! One thread serves all devices (sequential I/O per device; a slow disk delays the
//! other devices' queues, never a vCPU).

use std::collections::HashMap;
use std::fmt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use devices::host::blk::FileDisk;
use devices::host::memory::HostMemory;
use devices::host::net::Tap;
use devices::host::rng::HostEntropy;
use devices::host::vsock::Muxer;
use devices::host::HostFds;
use devices::virtio::blk::Block;
use devices::virtio::mmio::{reg, MmioTransport};
use devices::virtio::net::Net;
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use devices::virtio::{Interrupt, VirtioDevice};

use crate::acpi::MmioDeviceInfo;
use crate::irq::IrqTrigger;
use crate::layout::*;
use crate::seccomp::{Sandbox, ThreadKind};
use crate::vm::kvm_err;
use crate::VmmError;

impl Interrupt for IrqTrigger {
    fn trigger(&self) {
        // A full eventfd counter still means "interrupt pending"; nothing is lost.
        let _ = self.0.write(1);
    }
}

// ---------------------------------------------------------------------------------
// Command-line specs

/// `--disk PATH[,readonly=on][,id=NAME]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    pub id: Option<String>,
}

/// `--net tap=NAME[,mac=MAC]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    pub mac: [u8; 6],
}

/// `--vsock cid=N,socket=PATH`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    pub cid: u64,
    pub socket: PathBuf,
}

/// The guest's virtio devices.
#[derive(Debug, Clone, Default)]
pub struct DeviceConfig {
    pub disks: Vec<DiskSpec>,
    pub net: Option<NetSpec>,
    pub vsock: Option<VsockSpec>,
    pub rng: bool,
}

/// The MAC a `--net` without `mac=` gets (QEMU's default, locally administered).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Split `a,k=v,k=v` into the leading bare word (if any) and the key/value pairs.
fn options(s: &str) -> Result<(Option<&str>, Vec<(&str, &str)>), String> {
    let mut bare = None;
    let mut kv = Vec::new();
    for (i, part) in s.split(',').enumerate() {
        match part.split_once('=') {
            Some((k, v)) => kv.push((k, v)),
            None if i == 0 && !part.is_empty() => bare = Some(part),
            None => return Err(format!("'{part}' is not KEY=VALUE")),
        }
    }
    Ok((bare, kv))
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

impl FromStr for DiskSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (bare, kv) = options(s)?;
        let mut spec = DiskSpec {
            path: bare.map(PathBuf::from).unwrap_or_default(),
            read_only: false,
            id: None,
        };
        for (k, v) in kv {
            match k {
                "path" => spec.path = v.into(),
                "readonly" => spec.read_only = on_off(k, v)?,
                "id" if v.len() <= devices::virtio::blk::ID_BYTES => spec.id = Some(v.into()),
                "id" => return Err(format!("id={v}: at most 20 bytes")),
                _ => return Err(format!("unknown disk option '{k}' (path, readonly, id)")),
            }
        }
        if spec.path.as_os_str().is_empty() {
            return Err("no image path (--disk PATH[,readonly=on][,id=NAME])".into());
        }
        Ok(spec)
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok().filter(|_| b.len() == 2))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("mac={s}: expected six hex bytes like 52:54:00:12:34:56"))?;
    let mac: [u8; 6] = bytes
        .try_into()
        .map_err(|_| format!("mac={s}: expected six hex bytes like 52:54:00:12:34:56"))?;
    if mac[0] & 1 != 0 {
        return Err(format!("mac={s} is a multicast address"));
    }
    Ok(mac)
}

impl FromStr for NetSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (bare, kv) = options(s)?;
        let mut tap = bare.map(String::from);
        let mut mac = DEFAULT_MAC;
        for (k, v) in kv {
            match k {
                "tap" => tap = Some(v.into()),
                "mac" => mac = parse_mac(v)?,
                _ => return Err(format!("unknown net option '{k}' (tap, mac)")),
            }
        }
        let tap = tap
            .filter(|t| !t.is_empty())
            .ok_or("no tap device (--net tap=NAME[,mac=MAC])")?;
        Ok(NetSpec { tap, mac })
    }
}

impl FromStr for VsockSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (bare, kv) = options(s)?;
        if let Some(b) = bare {
            return Err(format!(
                "'{b}' is not KEY=VALUE (--vsock cid=N,socket=PATH)"
            ));
        }
        let (mut cid, mut socket) = (None, None);
        for (k, v) in kv {
            match k {
                "cid" => {
                    cid = Some(
                        v.parse::<u64>()
                            .map_err(|_| format!("cid={v}: not a number"))?,
                    )
                }
                "socket" | "uds_path" => socket = Some(PathBuf::from(v)),
                _ => return Err(format!("unknown vsock option '{k}' (cid, socket)")),
            }
        }
        let cid = cid.ok_or("no cid (--vsock cid=N,socket=PATH)")?;
        // 0, 1 and 2 are the hypervisor, local and host; u32::MAX is VMADDR_CID_ANY.
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(format!("cid={cid}: guest CIDs are 3 to 4294967294"));
        }
        let socket = socket
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or("no socket path (--vsock cid=N,socket=PATH)")?;
        Ok(VsockSpec { cid, socket })
    }
}

// ---------------------------------------------------------------------------------
// Devices with their backends open, waiting for guest memory

/// A device behind its mmio transport, as the bus and the event loop see it.
pub trait MmioDevice: Send {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
    fn num_queues(&self) -> usize;
    fn notify(&mut self, queue: usize);
    fn fds(&self) -> Vec<(RawFd, u32)>;
    fn fd_ready(&mut self, fd: RawFd, events: u32);
    fn interrupt_status(&self) -> Arc<AtomicU32>;
}

impl<D: VirtioDevice + HostFds> MmioDevice for MmioTransport<D, HostMemory> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
    fn num_queues(&self) -> usize {
        self.device().queue_max_sizes().len()
    }
    fn notify(&mut self, queue: usize) {
        MmioTransport::notify(self, queue)
    }
    fn fds(&self) -> Vec<(RawFd, u32)> {
        self.device().fds()
    }
    fn fd_ready(&mut self, fd: RawFd, events: u32) {
        self.device_mut().fd_ready(fd, events);
        self.backend_ready();
    }
    fn interrupt_status(&self) -> Arc<AtomicU32> {
        MmioTransport::interrupt_status(self)
    }
}

type Shared = Arc<Mutex<dyn MmioDevice>>;
type Build = Box<dyn FnOnce(HostMemory, IrqTrigger) -> Shared + Send>;

/// Devices whose backends are open (files, tap, sockets): every error about them has
/// been reported before the guest exists.
pub struct Prepared {
    devices: Vec<(String, Build)>,
}

fn build<D: VirtioDevice + HostFds + 'static>(device: D) -> Build {
    Box::new(move |mem, irq| Arc::new(Mutex::new(MmioTransport::new(device, mem, Box::new(irq)))))
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(n, _)| n))
            .finish()
    }
}

/// Open every backend the configuration names.
pub fn prepare(cfg: &DeviceConfig) -> Result<Prepared, VmmError> {
    let mut devices = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let disk = FileDisk::open(&d.path, d.read_only).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied if !d.read_only => {
                    " (add ,readonly=on to open it read-only)"
                }
                _ => "",
            };
            VmmError::Config(format!("--disk {}: {e}{hint}", d.path.display()))
        })?;
        let id = d.id.clone().unwrap_or_else(|| format!("vd{i}"));
        devices.push((
            format!("disk {}", d.path.display()),
            build(Block::new(disk, d.read_only, id.as_bytes())),
        ));
    }
    if let Some(n) = &cfg.net {
        let tap =
            Tap::open(&n.tap).map_err(|e| VmmError::Config(format!("--net tap={}: {e}", n.tap)))?;
        devices.push((format!("net {}", n.tap), build(Net::new(tap, n.mac))));
    }
    if let Some(v) = &cfg.vsock {
        let muxer = Muxer::new(v.cid, &v.socket)
            .map_err(|e| VmmError::Config(format!("--vsock socket={}: {e}", v.socket.display())))?;
        devices.push(("vsock".into(), build(Vsock::new(v.cid, muxer))));
    }
    if cfg.rng {
        devices.push(("rng".into(), build(Rng::new(HostEntropy))));
    }
    if devices.len() > MAX_VIRTIO_DEVICES {
        return Err(VmmError::Config(format!(
            "{} virtio devices requested; at most {MAX_VIRTIO_DEVICES} fit (one interrupt line each)",
            devices.len()
        )));
    }
    Ok(Prepared { devices })
}

impl Prepared {
    /// No devices: `attach` starts no event-loop thread.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// How many devices (each gets one mmio window and one interrupt line).
    pub fn len(&self) -> usize {
        self.devices.len()
    }
}

// ---------------------------------------------------------------------------------
// The bus the vCPUs see

struct Slot {
    base: u64,
    isr: Arc<AtomicU32>,
    dev: Shared,
}

/// The virtio-mmio windows. `read`/`write` return false for addresses no device claims.
#[derive(Default)]
pub struct MmioBus {
    slots: Vec<Slot>,
}

impl MmioBus {
    fn find(&self, addr: u64) -> Option<(&Slot, u64)> {
        let index =
            usize::try_from(addr.checked_sub(VIRTIO_MMIO_START)? / VIRTIO_MMIO_SIZE).ok()?;
        let slot = self.slots.get(index)?;
        Some((slot, addr - slot.base))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((slot, reg::INTERRUPT_STATUS)) if data.len() == 4 => {
                data.copy_from_slice(&slot.isr.load(Ordering::SeqCst).to_le_bytes())
            }
            Some((slot, offset)) => slot.dev.lock().unwrap().read(offset, data),
            None => return false,
        }
        true
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((slot, reg::INTERRUPT_ACK)) if data.len() == 4 => {
                let v = u32::from_le_bytes(data.try_into().unwrap());
                slot.isr.fetch_and(!v, Ordering::SeqCst);
            }
            Some((slot, offset)) => slot.dev.lock().unwrap().write(offset, data),
            None => return false,
        }
        true
    }
}

/// Give the devices guest memory, an irqfd each and an ioeventfd per queue, start the
/// event loop, and return the bus and the devices' ACPI descriptions. The event-loop
/// thread (started only if there are devices) enters `sandbox` before its first event.
pub fn attach(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    prepared: Prepared,
    sandbox: &Arc<Sandbox>,
) -> Result<(MmioBus, Vec<MmioDeviceInfo>), VmmError> {
    let mut bus = MmioBus::default();
    let mut infos = Vec::new();
    let mut looped = Vec::new();
    for (index, (_name, make)) in prepared.devices.into_iter().enumerate() {
        let base = virtio_mmio_base(index);
        let gsi = VIRTIO_IRQ_BASE + index as u32;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::Io)?;
        vm.register_irqfd(&irq, gsi)
            .map_err(kvm_err("register a virtio irqfd"))?;
        let dev = make(HostMemory(mem.clone()), IrqTrigger(Arc::new(irq)));
        let (isr, nq) = {
            let d = dev.lock().unwrap();
            (d.interrupt_status(), d.num_queues())
        };
        let mut kicks = Vec::new();
        for q in 0..nq {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::Io)?;
            vm.register_ioevent(
                &evt,
                &IoEventAddress::Mmio(base + VIRTIO_MMIO_NOTIFY_OFFSET),
                q as u32,
            )
            .map_err(kvm_err("register a virtio ioeventfd"))?;
            kicks.push(evt);
        }
        bus.slots.push(Slot {
            base,
            isr,
            dev: dev.clone(),
        });
        infos.push(MmioDeviceInfo {
            base,
            len: VIRTIO_MMIO_SIZE,
            gsi,
        });
        looped.push((dev, kicks));
    }
    if !looped.is_empty() {
        let event_loop = EventLoop::new(looped).map_err(VmmError::Io)?;
        let sandbox = sandbox.clone();
        thread::Builder::new()
            .name("virtio".into())
            .spawn(move || {
                if sandbox.enter(ThreadKind::EventLoop) {
                    event_loop.run()
                }
            })
            .map_err(VmmError::Io)?;
    }
    Ok((bus, infos))
}

// ---------------------------------------------------------------------------------
// The event loop

/// Epoll data: device index in the high half; a queue index, or a backend fd with
/// `FD_TAG` set, in the low half.
const FD_TAG: u64 = 1 << 31;

struct EventLoop {
    epoll: Epoll,
    devices: Vec<(Shared, Vec<EventFd>)>,
    /// The backend fds each device had registered after its last event.
    registered: Vec<HashMap<RawFd, u32>>,
}

impl EventLoop {
    fn new(devices: Vec<(Shared, Vec<EventFd>)>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        for (d, (_, kicks)) in devices.iter().enumerate() {
            for (q, evt) in kicks.iter().enumerate() {
                let data = (d as u64) << 32 | q as u64;
                epoll.ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, data),
                )?;
            }
        }
        let registered = vec![HashMap::new(); devices.len()];
        let mut el = EventLoop {
            epoll,
            devices,
            registered,
        };
        for d in 0..el.devices.len() {
            el.sync_fds(d);
        }
        Ok(el)
    }

    /// Make the epoll set match what device `d`'s backend wants now. Every current fd is
    /// re-armed (MOD, or ADD if epoll forgot it): a backend may have closed an fd and
    /// opened another with the same number since the last call.
    fn sync_fds(&mut self, d: usize) {
        let wanted: HashMap<RawFd, u32> = self.devices[d]
            .0
            .lock()
            .unwrap()
            .fds()
            .into_iter()
            .collect();
        let old = std::mem::take(&mut self.registered[d]);
        for fd in old.keys().filter(|fd| !wanted.contains_key(fd)) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, *fd, EpollEvent::default());
        }
        for (&fd, &events) in &wanted {
            let ev = EpollEvent::new(
                EventSet::from_bits_truncate(events),
                (d as u64) << 32 | FD_TAG | fd as u64,
            );
            if self.epoll.ctl(ControlOperation::Modify, fd, ev).is_err() {
                let _ = self.epoll.ctl(ControlOperation::Add, fd, ev);
            }
        }
        self.registered[d] = wanted;
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("vmm: virtio event loop stopped: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let d = (ev.data() >> 32) as usize;
                let low = ev.data() & 0xffff_ffff;
                let Some((dev, kicks)) = self.devices.get(d) else {
                    continue;
                };
                if low & FD_TAG != 0 {
                    dev.lock()
                        .unwrap()
                        .fd_ready((low & !FD_TAG) as RawFd, ev.events());
                } else {
                    let q = low as usize;
                    // Drain the counter, then run the queue: kicks that arrive meanwhile
                    // wake us again.
                    let _ = kicks[q].read();
                    dev.lock().unwrap().notify(q);
                }
                self.sync_fds(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        assert_eq!(
            "a.img,readonly=on,id=root".parse::<DiskSpec>().unwrap(),
            DiskSpec {
                path: "a.img".into(),
                read_only: true,
                id: Some("root".into())
            }
        );
        assert_eq!(
            "path=b.img".parse::<DiskSpec>().unwrap().path,
            PathBuf::from("b.img")
        );
        for bad in [
            "",
            "readonly=on",
            "a.img,readonly=maybe",
            "a.img,cache=none",
            "a.img,ro",
            "a.img,id=123456789012345678901",
        ] {
            assert!(bad.parse::<DiskSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn net_specs() {
        let n: NetSpec = "tap=tap0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!("tap=t".parse::<NetSpec>().unwrap().mac, DEFAULT_MAC);
        for bad in [
            "",
            "mac=02:00:00:00:00:01",
            "tap=t,mac=01:00:00:00:00:00",
            "tap=t,mac=2:0:0:0:0:1",
            "tap=t,mac=02:00:00:00:00",
            "tap=t,speed=10",
        ] {
            assert!(bad.parse::<NetSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vsock_specs() {
        let v: VsockSpec = "cid=3,socket=/tmp/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.socket), (3, PathBuf::from("/tmp/v.sock")));
        for bad in [
            "cid=2,socket=/x",
            "cid=4294967295,socket=/x",
            "cid=3",
            "socket=/x",
            "cid=x,socket=/x",
            "/x",
        ] {
            assert!(bad.parse::<VsockSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unclaimed_mmio_is_not_claimed() {
        let bus = MmioBus::default();
        let mut b = [0; 4];
        assert!(!bus.read(VIRTIO_MMIO_START, &mut b));
        assert!(!bus.read(0, &mut b));
        assert!(!bus.write(u64::MAX, &[1, 2, 3, 4]));
    }
}
