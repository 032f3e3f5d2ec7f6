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

use devices::platform::{AcpiPm, ExitPort, I8042Reset, PvPanic};
use devices::uart::Uart16550;
use devices::{GuestEvent, PioDevice};
use mkrt::abi::{
    guest, guest_route, irq_control, label, task_new, Fpage, Rights, ThreadId, Timeout,
};
use mkrt::bootinfo::layout;
use mkrt::msg::{receive, reply_wait, send, Msg};
use mkrt::{port, println, sys};

use crate::{booted_with, device, park, report, Root, POOL};

/// Where the server keeps the guest's RAM (guest-physical 0 is `WINDOW`).
const WINDOW: u64 = 0xa000_0000;
const WINDOW_LOG2: u8 = 29;
/// Label of the root's messages that map memory into a task's window (RAM, registers, DMA).
const MAPPED: u64 = 0x4a3;
/// The most guest RAM the window holds.
pub const MAX_RAM: u64 = 1 << WINDOW_LOG2;

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
        if from != vcpu || m.label() != label::GUEST_EXIT {
            // only the vCPU talks to the server: anyone else is ignored
            (from, m) = match receive(vcpu, Timeout::NEVER, mkrt::msg::NO_WINDOW) {
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

/// Start device task `i` for VM0's device `i`: guest RAM, the device's registers, a
/// DMA buffer, the device's interrupt; returns its thread once it is ready.
fn start_device(root: &Root, i: u64, ram: (u64, u64), pool_phys: u64) -> Result<ThreadId, ()> {
    let fail = |what: &str, e: u64| println!("root: device task {i}: {what}: error {e}");
    let t = root.spawn(device::task, 0).map_err(|e| fail("cannot start it", e))?;
    give_ram(t, ram.0, ram.1).map_err(|e| fail("guest RAM not taken", e))?;
    let regs = Fpage::new(layout::DEVICES + 4096 * i, 12, Rights::RW).expect("page");
    give(t, regs, device::REGS_AT).map_err(|e| fail("registers not taken", e))?;
    let dma = POOL.run(device::DMA_LOG2.into()).ok_or_else(|| fail("no DMA memory", 0))?;
    let dma_page = Fpage::new(dma, device::DMA_LOG2, Rights::RW).expect("aligned run");
    give(t, dma_page, device::DMA_AT).map_err(|e| fail("DMA buffer not taken", e))?;
    let line = u64::from(layout::DEVICE_IRQ_BASE) + i;
    sys::irq_control(irq_control::ATTACH, line, t).map_err(|e| fail("interrupt", e))?;
    let phys = dma - layout::POOL_BASE + pool_phys;
    root.tell(t, &[i, line, line, ram.1, phys]).map_err(|e| fail("no boot message", e))?;
    let m = root.expect(t, 3000).map_err(|e| fail("no report", e))?;
    if m.word(0) != device::ready::OK {
        println!("root: device task {i}: {}", device::why(m.word(0)));
        return Err(());
    }
    Ok(t)
}

/// Hosted mode: start a device task per virtio device and the guest server with the
/// reserved RAM, and wait for the guest to end. Returns the exit word for the vmm
/// (`port::end`).
pub fn run(root: &Root, ram: Option<(u64, u64)>, devices: u64, pool_phys: u64) -> (u8, u8) {
    let Some((base, size)) = ram else {
        println!("root: no room in VM0 for the guest's RAM");
        return (port::ENDED_FAILED, 1);
    };
    if devices > layout::MAX_DEVICES || size > device::MAX_RAM {
        println!("root: {devices} devices or {size} bytes of RAM are too many for device tasks");
        return (port::ENDED_FAILED, 1);
    }
    let mut words = [0u64; 3 + layout::MAX_DEVICES as usize];
    for i in 0..devices {
        match start_device(root, i, (base, size), pool_phys) {
            Ok(t) => words[3 + i as usize] = t.raw(),
            Err(()) => return (port::ENDED_FAILED, 1),
        }
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
    let Ok(m) = root.expect(s, u32::MAX) else {
        return (port::ENDED_FAILED, 1);
    };
    for (i, &t) in words[3..3 + devices as usize].iter().enumerate() {
        let t = ThreadId(t as u32);
        let asked = send(t, &mut Msg::new(device::STATS, &[]), Timeout(100));
        if let Ok(c) = asked.and_then(|_| root.expect(t, 100)) {
            println!(
                "device task {i}: {} exits as IPC ({} queue notifications), {} requests to VM0's device, {} interrupts by IPC",
                c.word(0),
                c.word(1),
                c.word(2),
                c.word(3)
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
