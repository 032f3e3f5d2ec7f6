//! Hosted mode's guest server: the task that owns a Linux guest's VM, its RAM, and
//! every exit that belongs to no device (`vmm --kernel ... --hosted`).
//!
//! The root reserves the guest's RAM in its pool before anything else (so the run is
//! aligned and physically contiguous) and hands it to the server as naturally aligned
//! chunks, one map item each, into the server's window (the sigma0 role). The server
//! makes the guest (`task_new` with `GUEST`) and becomes the vCPU's pager; its reply
//! to the vCPU's `START` exit maps the whole window at guest-physical 0, and the vmm
//! then loads the kernel, initrd, boot parameters and ACPI tables there (the firmware
//! role). From then on every port or MMIO access KVM does not absorb arrives here as
//! an IPC and the reply resumes the vCPU:
//!
//! - COM1 (0x3f8..0x400): `devices::uart`; bytes go to VM0's console a line at a time,
//!   the transmitter-empty interrupt goes back as a pulse of IOAPIC pin 4 in the reply;
//! - the platform ports of `devices::platform`: ACPI sleep/reset (0x600), i8042 reset
//!   (0x64), pvpanic (0x505), the exit-status port (0x501) — the same code as native;
//! - anything else (unknown ports, MMIO outside RAM) reads as all ones and ignores
//!   writes, as on a PC with nothing there.
//!
//! The guest's virtio devices are not the server's: each has a device task (`device`)
//! that the root sets up before the server, and the server routes the guest's exits in
//! that device's window to it (`guest_route`) before the guest runs.
//!
//! When the guest powers off, resets, panics or its vCPU stops, the server reports to
//! the root, which ends VM0 with the guest's status.
//!
//! The root supervises the device tasks. A fault the root's pager cannot resolve in a
//! device task (a bug, or the test-only crash of `vmm --test-device-faults`) is
//! reported to the root, which restarts the device: it starts a new task for it with
//! the same state page, DMA buffer and interrupt line, has the server route the
//! device's window to the new task, and only then deletes the old one. The guest exit
//! the old task died on is not lost: the kernel raises an unanswered exit again when its
//! handler is deleted, and the route now leads to the new task, which carries on from
//! the state page (`device`). The guest sees one slow MMIO access.

use core::sync::atomic::{AtomicU64, Ordering};
use devices::platform::{AcpiPm, ExitPort, I8042Reset, PvPanic};
use devices::uart::Uart16550;
use devices::{GuestEvent, PioDevice};
use mkrt::abi::{
    guest, guest_route, irq_control, label, task_new, Fpage, Rights, ThreadId, Timeout,
};
use mkrt::bootinfo::layout;

use mkrt::msg::{receive, reply_wait, send, Msg, NO_WINDOW};
use mkrt::{port, println, sys};

use crate::{booted_with, device, park, report, Root, POOL};

/// Where the server keeps the guest's RAM (guest-physical 0 is `WINDOW`).
const WINDOW: u64 = 0xa000_0000;
const WINDOW_LOG2: u8 = 29;
/// Label of the root's messages that map memory into a task's window (RAM, registers, DMA).
const MAPPED: u64 = 0x4a3;
/// The most guest RAM the window holds.
pub const MAX_RAM: u64 = 1 << WINDOW_LOG2;
/// Label of the root's request to the server: route device `i`'s window to thread `t`
/// (words `i`, `t`); the reply's word 0 is 0 or the `guest_route` error.
const REROUTE: u64 = 0x4e40;
/// Label of the pager's notice to the root that a device task faulted.
const FAULTED_NOTICE: u64 = 0xfa17;
/// How often the root looks for faulted device tasks besides the pager's notices
/// (which it misses while busy): 10 ms ticks.
const SUPERVISE_TICKS: u32 = 50;
/// A device that faults this often is not restarted again.
const MAX_RESTARTS: u32 = 16;

/// The root's main thread (raw id), for the pager's notices.
static ROOT: AtomicU64 = AtomicU64::new(0);
/// The thread (raw id) of each device task the root supervises, 0 for none.
static SUPERVISED: [AtomicU64; layout::MAX_DEVICES as usize] =
    [const { AtomicU64::new(0) }; layout::MAX_DEVICES as usize];
/// Per device: the thread (raw id) that faulted, until the root has restarted it.
static FAULTED: [AtomicU64; layout::MAX_DEVICES as usize] =
    [const { AtomicU64::new(0) }; layout::MAX_DEVICES as usize];
/// The guest server (raw id), and whether it faulted (which ends the guest).
static SERVER: AtomicU64 = AtomicU64::new(0);
static SERVER_FAULTED: AtomicU64 = AtomicU64::new(0);

/// A fault of `t` nobody will resolve (a page fault the pager cannot serve, or an
/// exception): if `t` is a supervised device task or the guest server, note it for the
/// root and tell the root (if it waits); true if so. The thread stays blocked in its
/// fault until the root deletes it.
pub fn faulted(t: ThreadId) -> bool {
    let i = SUPERVISED.iter().position(|s| s.load(Ordering::SeqCst) == t.raw());
    match i {
        Some(i) => FAULTED[i].store(t.raw(), Ordering::SeqCst),
        None if SERVER.load(Ordering::SeqCst) == t.raw() => {
            SERVER_FAULTED.store(1, Ordering::SeqCst)
        }
        None => return false,
    }
    let root = ThreadId(ROOT.load(Ordering::SeqCst) as u32);
    let _ = send(root, &mut Msg::new(FAULTED_NOTICE, &[]), Timeout::ZERO);
    true
}

const COM1: u64 = 0x3f8;
const COM1_PIN: u32 = 4;
const EXIT_STATUS: u64 = 0x501;
const PVPANIC: u64 = 0x505;
const ACPI_PM: u64 = 0x600;
const I8042_CMD: u64 = 0x64;

/// How the guest ended (the server's report, word 0).
mod end {
    pub const POWER_OFF: u64 = 0;
    pub const RESET: u64 = 1;
    pub const PANIC: u64 = 2;
    /// Triple fault, KVM internal error or failed entry: the vCPU cannot go on.
    pub const STOPPED: u64 = 3;
    /// The server could not start the guest.
    pub const FAILED: u64 = 4;
}

/// Exits seen, by kind (printed at the end: the count of exits that became IPCs).
#[derive(Default)]
struct Counts {
    io_in: u64,
    io_out: u64,
    mmio: u64,
    console: u64,
}

/// Guest console output, a line at a time.
struct Line {
    buf: [u8; 120],
    len: usize,
}

impl Line {
    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
        if b == b'\n' || self.len == self.buf.len() {
            self.flush();
        }
    }
    fn flush(&mut self) {
        if self.len > 0 {
            let _ = sys::debug_write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

/// The platform: what the guest server emulates itself.
struct Platform {
    uart: Uart16550,
    line: Line,
    pm: AcpiPm,
    i8042: I8042Reset,
    pvpanic: PvPanic,
    exit: ExitPort,
    status: u8,
}

/// What an answered exit asks for.
struct Answer {
    value: u64,
    pulse: u64,
    event: Option<GuestEvent>,
}

impl Platform {
    fn pio(&mut self, port: u64) -> Option<(&mut dyn PioDevice, u16)> {
        let dev: &mut dyn PioDevice = match port {
            ACPI_PM => &mut self.pm,
            I8042_CMD => &mut self.i8042,
            PVPANIC => &mut self.pvpanic,
            EXIT_STATUS => &mut self.exit,
            _ => return None,
        };
        Some((dev, 0))
    }

    fn io_in(&mut self, port: u64, size: usize) -> Answer {
        let value = if (COM1..COM1 + 8).contains(&port) && size == 1 {
            u64::from(self.uart.read((port - COM1) as u8))
        } else if let Some((dev, offset)) = self.pio(port) {
            let mut data = [0u8; 8];
            dev.read(offset, &mut data[..size.clamp(1, 8)]);
            u64::from_le_bytes(data)
        } else {
            u64::MAX
        };
        Answer { value, pulse: 0, event: None }
    }

    fn io_out(&mut self, port: u64, size: usize, data: u64) -> Answer {
        let mut a = Answer { value: 0, pulse: 0, event: None };
        if (COM1..COM1 + 8).contains(&port) && size == 1 {
            let w = self.uart.write((port - COM1) as u8, data as u8);
            if let Some(b) = w.byte {
                self.line.push(b);
            }
            if w.interrupt {
                a.pulse = 1 << COM1_PIN;
            }
        } else if let Some((dev, offset)) = self.pio(port) {
            let bytes = data.to_le_bytes();
            a.event = dev.write(offset, &bytes[..size.clamp(1, 8)]);
        }
        if let Some(GuestEvent::ExitStatus(s)) = a.event {
            self.status = s;
            a.event = None;
        }
        a
    }
}

extern "C" fn server() -> ! {
    let window = Fpage::new(WINDOW, WINDOW_LOG2, Rights::ALL).expect("aligned window");
    // The RAM chunks land in the window; the boot message comes last.
    let (root, boot) = booted_with(window);
    let me = ThreadId(boot.word(0) as u32);
    let vcpu = match sys::task_new(me, 0, 0, task_new::GUEST) {
        Ok(v) => v,
        Err(e) => {
            println!("guest server: task_new(GUEST) failed: error {e}");
            report(root, &[end::FAILED, 0]);
            park()
        }
    };
    // the device tasks answer the exits in their windows
    for i in 0..boot.word(2).min(layout::MAX_DEVICES) {
        let (base, task) =
            (layout::DEVICE_PHYS + 4096 * i, ThreadId(boot.word(3 + i as usize) as u32));
        if let Err(e) = sys::guest_route(vcpu, guest_route::MMIO, base, 4096, task) {
            println!("guest server: cannot route device {i} to its task: error {e}");
            report(root, &[end::FAILED, 0]);
            park()
        }
    }
    let Ok((mut from, mut m)) = receive(vcpu, Timeout(500), mkrt::msg::NO_WINDOW) else {
        println!("guest server: the vCPU sent no START exit");
        report(root, &[end::FAILED, 0]);
        park()
    };
    let mut p = Platform {
        uart: Uart16550::new(),
        line: Line { buf: [0; 120], len: 0 },
        pm: AcpiPm,
        i8042: I8042Reset,
        pvpanic: PvPanic,
        exit: ExitPort,
        status: 0,
    };
    let mut n = Counts::default();
    let how = loop {
        if from == root && m.label() == REROUTE {
            // a restarted device task takes over the device's window
            let (i, task) = (m.word(0), ThreadId(m.word(1) as u32));
            let base = layout::DEVICE_PHYS + 4096 * i;
            // the same range: the kernel swaps the handler in one step
            let moved = sys::guest_route(vcpu, guest_route::MMIO, base, 4096, task);
            let mut reply = Msg::new(REROUTE, &[moved.err().unwrap_or(0)]);
            (from, m) = match reply_wait(root, &mut reply) {
                Ok(f) => (f, reply),
                Err(_) => break end::STOPPED,
            };
            continue;
        }
        if from != vcpu || m.label() != label::GUEST_EXIT {
            // only the vCPU and the root talk to the server: anyone else is ignored
            (from, m) = match receive(ThreadId::ANY, Timeout::NEVER, NO_WINDOW) {
                Ok(x) => x,
                Err(_) => break end::STOPPED,
            };
            continue;
        }
        let (kind, size) = (m.word(0) & 0xff, ((m.word(0) >> 8) & 0xff) as usize);
        let (addr, data) = (m.word(1), m.word(2));
        let a = match kind {
            guest::START => {
                // the whole window: exactly the pages the root gave us become guest RAM
                let mut reply = Msg::map(0, window, 0, false);
                (from, m) = match reply_wait(from, &mut reply) {
                    Ok(f) => (f, reply),
                    Err(_) => break end::STOPPED,
                };
                continue;
            }
            guest::IO_IN => {
                n.io_in += 1;
                p.io_in(addr, size)
            }
            guest::IO_OUT => {
                n.io_out += 1;
                n.console += u64::from((COM1..COM1 + 8).contains(&addr));
                p.io_out(addr, size, data)
            }
            // nothing is mapped there: all ones, writes go nowhere
            guest::MMIO_READ | guest::MMIO_WRITE => {
                n.mmio += 1;
                Answer { value: u64::MAX, pulse: 0, event: None }
            }
            _ => break end::STOPPED,
        };
        match a.event {
            Some(GuestEvent::PowerOff) => break end::POWER_OFF,
            Some(GuestEvent::Reset) => break end::RESET,
            Some(GuestEvent::Panic) => break end::PANIC,
            _ => {}
        }
        let mut reply = Msg::new(0, &[a.value, a.pulse]);
        (from, m) = match reply_wait(from, &mut reply) {
            Ok(f) => (f, reply),
            Err(_) => break end::STOPPED,
        };
    };
    p.line.flush();
    println!(
        "guest server: {} exits as IPC ({} in, {} out of which {} to COM1, {} MMIO)",
        n.io_in + n.io_out + n.mmio,
        n.io_in,
        n.io_out,
        n.console,
        n.mmio
    );
    // The vCPU waits in its last exit until VM0 ends.
    report(root, &[how, p.status.into()]);
    park()
}

/// Chunks of `size` bytes from offset 0: each naturally aligned, largest first.
fn chunks(size: u64) -> impl Iterator<Item = (u64, u32)> {
    let mut offset = 0u64;
    core::iter::from_fn(move || {
        let left = size.checked_sub(offset).filter(|&l| l >= 4096)?;
        let align = if offset == 0 { 63 } else { offset.trailing_zeros() };
        let log2 = align.min(63 - left.leading_zeros());
        let at = offset;
        offset += 1 << log2;
        Some((at, log2))
    })
}

/// Reserve the guest's RAM: the first thing the root takes from its pool, so it starts
/// at the pool's (aligned) base and is physically contiguous.
pub fn reserve(ram_mib: u64) -> Option<(u64, u64)> {
    let size = ram_mib << 20;
    if size == 0 || size > MAX_RAM {
        return None;
    }
    let align = 1 << (63 - size.leading_zeros());
    POOL.take(size, align).map(|base| (base, size))
}

/// Map `fpage` of the root's into task `t`'s receive window at `offset`.
fn give(t: ThreadId, fpage: Fpage, offset: u64) -> Result<(), u64> {
    send(t, &mut Msg::map(MAPPED, fpage, offset, false), Timeout(500))
}

/// Map the guest's RAM into task `t`'s window from offset 0.
fn give_ram(t: ThreadId, base: u64, size: u64) -> Result<(), u64> {
    for (offset, log2) in chunks(size) {
        give(
            t,
            Fpage::new(base + offset, log2 as u8, Rights::ALL).expect("aligned chunk"),
            offset,
        )?;
    }
    Ok(())
}

/// A guest device as the root keeps it: what outlives its device task.
struct Device {
    i: u64,
    /// The current task's thread.
    thread: ThreadId,
    /// The DMA run (root address) and the state page (root address).
    dma: u64,
    state: u64,
    restarts: u32,
}

impl Device {
    /// Device `i`'s memory from the pool (the state page zeroed: no saved setup yet).
    fn new(i: u64) -> Option<Device> {
        let dma = POOL.run(device::DMA_LOG2.into())?;
        let state = POOL.page()?;
        // SAFETY: a whole page of the root's pool, mapped in the root, used by no one yet.
        unsafe { core::ptr::write_bytes(state as *mut u8, 0, 4096) };
        Some(Device { i, thread: ThreadId::NIL, dma, state, restarts: 0 })
    }

    /// Start a task for the device: guest RAM, the device's registers, its state page,
    /// the DMA buffer, the device's interrupt; returns its thread once it is ready.
    fn start(
        &self,
        root: &Root,
        ram: (u64, u64),
        pool_phys: u64,
        flags: u64,
    ) -> Result<ThreadId, ()> {
        let i = self.i;
        let fail = |what: &str, e: u64| println!("root: device task {i}: {what}: error {e}");
        let t = root.spawn(device::task, 0).map_err(|e| fail("cannot start it", e))?;
        // supervised from its first instruction: a fault while it sets up or restores is
        // reported like any other (and counts against `MAX_RESTARTS`)
        SUPERVISED[i as usize].store(t.raw(), Ordering::SeqCst);
        let given = || -> Result<(), ()> {
            give_ram(t, ram.0, ram.1).map_err(|e| fail("guest RAM not taken", e))?;
            let regs = Fpage::new(layout::DEVICES + 4096 * i, 12, Rights::RW).expect("page");
            give(t, regs, device::REGS_AT).map_err(|e| fail("registers not taken", e))?;
            let state = Fpage::new(self.state, 12, Rights::RW).expect("page");
            give(t, state, device::STATE_AT).map_err(|e| fail("state page not taken", e))?;
            if flags & device::boot::PAIRED != 0 {
                // the doorbell that raises the guest's pin, and the guest's notifications
                let at = layout::DEVICES + 4096 * (layout::MAX_DEVICES + i);
                let bell = Fpage::new(at, 12, Rights::RW).expect("page");
                give(t, bell, device::DOORBELL_AT).map_err(|e| fail("doorbell not taken", e))?;
                let notify = u64::from(layout::NOTIFY_IRQ_BASE) + i;
                sys::irq_control(irq_control::ATTACH, notify, t)
                    .map_err(|e| fail("notification line", e))?;
            }
            let dma = Fpage::new(self.dma, device::DMA_LOG2, Rights::RW).expect("aligned run");
            give(t, dma, device::DMA_AT).map_err(|e| fail("DMA buffer not taken", e))?;
            let line = u64::from(layout::DEVICE_IRQ_BASE) + i;
            sys::irq_control(irq_control::ATTACH, line, t).map_err(|e| fail("interrupt", e))?;
            let phys = self.dma - layout::POOL_BASE + pool_phys;
            let boot = [i, line, line, ram.1, phys, flags];
            root.tell(t, &boot).map_err(|e| fail("no boot message", e))?;
            let m = root.expect(t, 3000).map_err(|e| fail("no report", e))?;
            if m.word(0) != device::ready::OK {
                println!("root: device task {i}: {}", device::why(m.word(0)));
                return Err(());
            }
            Ok(())
        };
        match given() {
            Ok(()) => Ok(t),
            Err(()) => {
                root.kill(t);
                Err(())
            }
        }
    }

    /// The device's task faulted: start a new one, have the server route the device's
    /// window to it, then delete the old task (whose unanswered exit, if any, the kernel
    /// raises again: it reaches the new task). Err: the device stays dead.
    fn restart(
        &mut self,
        root: &Root,
        server: ThreadId,
        ram: (u64, u64),
        pool_phys: u64,
        flags: u64,
    ) -> Result<(), ()> {
        let (i, old) = (self.i, self.thread);
        self.restarts += 1;
        if self.restarts > MAX_RESTARTS {
            println!("root: device task {i} faulted {MAX_RESTARTS} times; not restarting it");
            return Err(());
        }
        for line in [layout::DEVICE_IRQ_BASE, layout::NOTIFY_IRQ_BASE] {
            let _ = sys::irq_control(irq_control::DETACH, u64::from(line) + i, ThreadId::NIL);
        }
        let new = self.start(root, ram, pool_phys, flags | device::boot::RESTARTED)?;
        let mut m = Msg::new(REROUTE, &[i, new.raw()]);
        let t = Timeout::pair(Timeout(500), Timeout(500));
        let routed = sys::ipc(server, server, t, NO_WINDOW, &mut m.mr).map(|_| m.word(0));
        if routed != Ok(0) {
            println!(
                "root: device task {i}: the server did not route it to the new task: {routed:?}"
            );
            root.kill(new);
            return Err(());
        }
        root.kill(old);
        self.thread = new;
        // the old task's fault is dealt with; one of the new task's stays noted
        let _ =
            FAULTED[i as usize].compare_exchange(old.raw(), 0, Ordering::SeqCst, Ordering::SeqCst);
        println!(
            "root: device task {i} (thread {:#x}) faulted; restarted as thread {:#x} ({} restarts)",
            old.raw(),
            new.raw(),
            self.restarts
        );
        Ok(())
    }
}

/// Hosted mode: start a device task per virtio device and the guest server with the
/// reserved RAM, supervise the device tasks, and wait for the guest to end. `flags`
/// are the device tasks' boot flags (`device::boot::FAULTS`). Returns the exit word
/// for the vmm (`port::end`).
pub fn run(
    root: &Root,
    ram: Option<(u64, u64)>,
    devices: u64,
    pool_phys: u64,
    flags: u64,
) -> (u8, u8) {
    let Some((base, size)) = ram else {
        println!("root: no room in VM0 for the guest's RAM");
        return (port::ENDED_FAILED, 1);
    };
    if devices > layout::MAX_DEVICES || size > device::MAX_RAM {
        println!("root: {devices} devices or {size} bytes of RAM are too many for device tasks");
        return (port::ENDED_FAILED, 1);
    }
    ROOT.store(root.me.raw(), Ordering::SeqCst);
    let mut words = [0u64; 3 + layout::MAX_DEVICES as usize];
    let mut table = alloc::vec::Vec::new();
    for i in 0..devices {
        let Some(mut d) = Device::new(i) else {
            println!("root: device task {i}: no memory for its DMA buffer and state page");
            return (port::ENDED_FAILED, 1);
        };
        let Ok(t) = d.start(root, (base, size), pool_phys, flags) else {
            return (port::ENDED_FAILED, 1);
        };
        d.thread = t;
        words[3 + i as usize] = t.raw();
        table.push(d);
    }
    let s = match root.spawn(server, task_new::PRIVILEGED) {
        Ok(s) => s,
        Err(e) => {
            println!("root: cannot start the guest server: error {e}");
            return (port::ENDED_FAILED, 1);
        }
    };
    if let Err(e) = give_ram(s, base, size) {
        println!("root: the guest server did not take its RAM: error {e}");
        return (port::ENDED_FAILED, 1);
    }
    words[..3].copy_from_slice(&[s.raw(), size, devices]);
    if root.tell(s, &words[..3 + devices as usize]).is_err() {
        return (port::ENDED_FAILED, 1);
    }
    SERVER.store(s.raw(), Ordering::SeqCst);
    // supervise the device tasks until the server reports the guest's end
    let m = loop {
        match receive(ThreadId::ANY, Timeout(SUPERVISE_TICKS), NO_WINDOW) {
            Ok((from, m)) if from == s && m.label() == crate::REPORT => break m,
            // an exception of a task this root supervises (it is their supervisor)
            Ok((from, m)) if m.label() == label::EXCEPTION => {
                println!(
                    "root: thread {:#x} raised exception {} at ip {:#x}",
                    from.raw(),
                    m.word(0),
                    m.word(2)
                );
                faulted(from);
            }
            // a fault notice, anything else, or the periodic look
            _ => {}
        }
        if SERVER_FAULTED.load(Ordering::SeqCst) != 0 {
            println!("root: the guest server faulted; the guest cannot go on");
            return (port::ENDED_FAILED, 1);
        }
        for d in table.iter_mut() {
            if FAULTED[d.i as usize].load(Ordering::SeqCst) == d.thread.raw()
                && d.restart(root, s, (base, size), pool_phys, flags).is_err()
            {
                println!("root: device task {} could not be restarted", d.i);
                return (port::ENDED_FAILED, 1);
            }
        }
    };
    for (i, d) in table.iter().enumerate() {
        let t = d.thread;
        let asked = send(t, &mut Msg::new(device::STATS, &[]), Timeout(100));
        if let Ok(c) = asked.and_then(|_| root.expect(t, 100)) {
            println!(
                "device task {i}: {} exits as IPC, {} queue notifications ({} as interrupts), {} requests to VM0's device, {} interrupts outside replies",
                c.word(0),
                c.word(1),
                c.word(2),
                c.word(3),
                c.word(4)
            );
        }
    }
    let status = m.word(1) as u8;
    match m.word(0) {
        end::POWER_OFF | end::RESET => (port::ENDED, status),
        end::PANIC => (port::ENDED_PANIC, status),
        end::STOPPED => (port::ENDED_STOPPED, status),
        _ => (port::ENDED_FAILED, 1),
    }
}
