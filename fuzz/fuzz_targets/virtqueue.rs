//! The split virtqueue, device side (`devices::virtio::Queue`): a guest RAM image and
//! ring configuration from the input, then a sequence of pop / add_used / notification
//! calls, chain reads and writes, driver posts and scribbles. Never panics; checks the
//! shape of every chain and the accounting of `Reader`/`Writer`.

#![no_main]

use arbitrary::Arbitrary;
use devices::virtio::mem::VecMemory;
use devices::virtio::testing::DriverQueue;
use devices::virtio::{Chain, GuestMemory, Queue};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{Buf, Scribble, MAX_CHAIN};

const RAM: u64 = 0x1_0000;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Base {
    Zero,
    Page,
    /// RAM ends at the very top of the address space.
    Top,
    Raw(u64),
}

/// A ring address: an offset into RAM (aligned or not), or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum RingAddr {
    Offset(u16),
    Raw(u64),
}

impl RingAddr {
    fn get(self, base: u64) -> u64 {
        match self {
            RingAddr::Offset(o) => base.wrapping_add(u64::from(o)),
            RingAddr::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Config {
    size: u16,
    desc: RingAddr,
    avail: RingAddr,
    used: RingAddr,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Io {
    Read(u16),
    ReadExact(u16),
    Write(u16),
    WriteAll(u16),
    Skip(u32),
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Pop(Vec<Io>),
    AddUsed {
        head: u16,
        len: u32,
    },
    /// Return the last popped chain with what was written into it.
    ReturnLast,
    NeedsNotification,
    EnableNotification,
    ProcessAll {
        len: u32,
    },
    SetEventIdx(bool),
    Reconfigure(Config),
    Reset,
    Post(Vec<Buf>),
    Scribble(Scribble),
    /// A 16-bit store at an offset into RAM.
    Poke {
        offset: u16,
        value: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    base: Base,
    max_size_log: u8,
    config: Config,
    event_idx: bool,
    ops: Vec<Op>,
    ram: Vec<u8>,
}

fn check_chain(q: &Queue, c: &Chain) {
    assert!(c.head < q.size, "head {} >= size {}", c.head, q.size);
    assert!(!c.descs.is_empty() && c.descs.len() <= usize::from(q.size));
    let readable = c.descs.iter().take_while(|d| !d.writable).count();
    assert!(
        c.descs[readable..].iter().all(|d| d.writable),
        "readable after writable"
    );
    let rsum: u64 = c.descs[..readable].iter().map(|d| u64::from(d.len)).sum();
    let wsum: u64 = c.descs[readable..].iter().map(|d| u64::from(d.len)).sum();
    assert_eq!(c.reader().remaining(), rsum);
    assert_eq!(c.writer().remaining(), wsum);
}

/// Reads and writes on a chain; returns what was written.
fn exercise(mem: &dyn GuestMemory, c: &Chain, io: &[Io]) -> u32 {
    let mut r = c.reader();
    let mut w = c.writer();
    let mut buf = vec![0u8; 0];
    for &op in io.iter().take(16) {
        match op {
            Io::Read(n) | Io::ReadExact(n) => {
                buf.resize(usize::from(n), 0);
                let before = r.remaining();
                match op {
                    Io::Read(_) => {
                        if let Ok(k) = r.read(mem, &mut buf) {
                            assert!(k <= buf.len());
                            assert_eq!(r.remaining(), before - k as u64);
                        }
                    }
                    _ => {
                        if r.read_exact(mem, &mut buf).is_ok() {
                            assert_eq!(r.remaining(), before - buf.len() as u64);
                        }
                    }
                }
                assert!(r.remaining() <= before);
            }
            Io::Write(n) | Io::WriteAll(n) => {
                buf.resize(usize::from(n), 0xa5);
                let (before, room) = (w.written(), w.remaining());
                let res = match op {
                    Io::Write(_) => w.write(mem, &buf),
                    _ => w.write_all(mem, &buf).map(|()| buf.len()),
                };
                if let Ok(k) = res {
                    assert!(k <= buf.len());
                    assert_eq!(w.written(), before.saturating_add(k as u32));
                    assert_eq!(w.remaining(), room - k as u64);
                }
                assert!(w.remaining() <= room);
            }
            Io::Skip(n) => {
                let room = w.remaining();
                w.skip(u64::from(n));
                assert!(w.remaining() <= room);
            }
        }
    }
    w.written()
}

fn apply(q: &mut Queue, c: Config, base: u64) {
    q.size = c.size;
    q.desc_table = c.desc.get(base);
    q.avail_ring = c.avail.get(base);
    q.used_ring = c.used.get(base);
    q.ready = true;
}

fuzz_target!(|input: Input| {
    let base = match input.base {
        Base::Zero => 0,
        Base::Page => 0x1000,
        Base::Top => u64::MAX - (RAM - 1),
        Base::Raw(b) => b.min(u64::MAX - (RAM - 1)),
    };
    let mem = VecMemory::new(base, RAM as usize);
    let n = input.ram.len().min(RAM as usize);
    mem.write(base, &input.ram[..n]).unwrap();

    let max_size = 1u16 << (input.max_size_log % 16);
    let mut q = Queue::new(max_size);
    q.set_event_idx(input.event_idx);
    apply(&mut q, input.config, base);
    let mut valid = q.validate(&mem).is_ok();
    let mut last: Option<(u16, u32)> = None;
    // Chains popped and not yet returned. A device returns only chains it popped; with
    // more used than popped, a used ring laid over the available ring feeds
    // `process_all` forever (the device writes the index it then reads).
    let mut owed: u32 = 0;
    let mut driver: Option<DriverQueue> = None;

    for op in input.ops.iter().take(256) {
        match op {
            Op::Reconfigure(c) => {
                apply(&mut q, *c, base);
                valid = q.validate(&mem).is_ok();
                driver = None;
                continue;
            }
            Op::Reset => {
                q.reset();
                owed = 0;
                last = None;
                valid = false;
                driver = None;
                continue;
            }
            Op::SetEventIdx(on) => {
                q.set_event_idx(*on);
                continue;
            }
            Op::Scribble(s) => {
                s.apply(&mem);
                continue;
            }
            Op::Poke { offset, value } => {
                let _ = mem.store_u16(base + u64::from(*offset).min(RAM - 2), *value);
                continue;
            }
            _ => {}
        }
        // The transport uses a queue only once its configuration validated.
        if !valid {
            continue;
        }
        assert!(q.size.is_power_of_two() && q.size <= max_size);
        assert!(mem.check_range(q.desc_table, 16 * u64::from(q.size)));
        match op {
            Op::Pop(io) => {
                if let Ok(Some(c)) = q.pop(&mem) {
                    owed += 1;
                    check_chain(&q, &c);
                    let written = exercise(&mem, &c, io);
                    last = Some((c.head, written));
                }
            }
            Op::AddUsed { head, len } => {
                if owed > 0 {
                    owed -= 1;
                    let _ = q.add_used(&mem, *head, *len);
                }
            }
            Op::ReturnLast => {
                if let Some((head, len)) = last.take().filter(|_| owed > 0) {
                    owed -= 1;
                    let _ = q.add_used(&mem, head, len);
                }
            }
            Op::NeedsNotification => {
                if q.needs_notification(&mem).is_ok() {
                    assert_eq!(
                        q.needs_notification(&mem),
                        Ok(false),
                        "notified twice for the same used index"
                    );
                }
            }
            Op::EnableNotification => {
                let _ = q.enable_notification(&mem);
            }
            Op::ProcessAll { len } => {
                let size = q.size;
                let _ = q.process_all(&mem, |c| {
                    assert!(c.head < size && c.descs.len() <= usize::from(size));
                    *len
                });
            }
            Op::Post(bufs) => {
                let dq = driver.get_or_insert_with(|| {
                    let mut dq = DriverQueue::new(q.size, 0);
                    dq.desc = q.desc_table;
                    dq.avail = q.avail_ring;
                    dq.used = q.used_ring;
                    dq
                });
                let bufs: Vec<_> = bufs
                    .iter()
                    .take(MAX_CHAIN)
                    .map(|b| {
                        (
                            base.wrapping_add(b.addr.get() % RAM),
                            b.len.get(),
                            b.writable,
                        )
                    })
                    .collect();
                if !bufs.is_empty() {
                    dq.add(&mem, &bufs);
                }
            }
            Op::Reconfigure(_)
            | Op::Reset
            | Op::SetEventIdx(_)
            | Op::Scribble(_)
            | Op::Poke { .. } => {
                unreachable!()
            }
        }
    }
});
