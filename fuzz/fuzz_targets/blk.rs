//! virtio-blk request parsing (`Block::queue_notify`) over an in-memory disk: requests
//! of any type, sector and buffer layout, a driver that scribbles over its rings, and
//! backend failures. Never panics; the disk is only touched inside its bounds, never
//! written when read-only, and no used length exceeds the chain's writable room.

#![no_main]

use arbitrary::Arbitrary;
use devices::virtio::blk::Block;
use devices::virtio::{Queue, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{
    driver_write, guest_ram, queue_size, BlkLayout, DiskFaults, Driver, FakeDisk, Scribble,
};

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    Raw(u32),
}

impl Kind {
    fn get(self) -> u32 {
        match self {
            Kind::In => 0,
            Kind::Out => 1,
            Kind::Flush => 4,
            Kind::GetId => 8,
            Kind::Discard => 11,
            Kind::Raw(k) => k,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Sector {
    Small(u8),
    Raw(u64),
}

impl Sector {
    fn get(self) -> u64 {
        match self {
            Sector::Small(s) => u64::from(s),
            Sector::Raw(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Segment {
    sector: Sector,
    count: Sector,
    flags: Option<u32>,
}

#[derive(Arbitrary, Debug, Clone)]
struct Request {
    /// Write a header (type, sector) at the first buffer; else whatever is there.
    header: Option<(Kind, Sector)>,
    /// Discard segments written at the second buffer.
    segments: Vec<Segment>,
    layout: BlkLayout,
    notify: bool,
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Submit(Request),
    Notify,
    Scribble(Scribble),
    ReadConfig { offset: u8, len: u8 },
    Reset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    sectors: u8,
    tail: u16,
    read_only: bool,
    discard: bool,
    faults: DiskFaults,
    qsize: u8,
    event_idx: bool,
    id: Vec<u8>,
    ops: Vec<Op>,
    ram: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let mem = guest_ram(&input.ram);
    let size = usize::from(input.sectors) * 512 + usize::from(input.tail % 512);
    let disk = FakeDisk {
        data: (0..size).map(|i| i as u8).collect(),
        faults: input.faults,
        discard: input.discard,
        read_only: input.read_only,
    };
    let mut blk = Block::new(disk, input.read_only, &input.id);
    let max = blk.queue_max_sizes()[0];
    let qsize = queue_size(input.qsize, max);
    let mut queues = [Queue::new(max)];
    let mut driver = Driver::new(0, qsize);
    driver.configure(&mut queues[0], input.event_idx);
    queues[0].validate(&mem).unwrap();
    blk.activate(0);

    for op in input.ops.iter().take(64) {
        let notify = match op {
            Op::Submit(req) => {
                let bufs = req.layout.bufs();
                let first = bufs.first().map(|b| b.addr.get());
                if let (Some((kind, sector)), Some(at)) = (req.header, first) {
                    let mut h = [0u8; 16];
                    h[0..4].copy_from_slice(&kind.get().to_le_bytes());
                    h[8..16].copy_from_slice(&sector.get().to_le_bytes());
                    if driver_write(&mem, at, &h) {
                        driver.clean = false;
                    }
                }
                if let Some(at) = bufs.get(1).map(|b| b.addr.get()) {
                    for (i, seg) in req.segments.iter().take(20).enumerate() {
                        let mut s = [0u8; 16];
                        s[0..8].copy_from_slice(&seg.sector.get().to_le_bytes());
                        s[8..12].copy_from_slice(&(seg.count.get() as u32).to_le_bytes());
                        s[12..16].copy_from_slice(&seg.flags.unwrap_or(0).to_le_bytes());
                        if driver_write(&mem, at.wrapping_add(16 * i as u64), &s) {
                            driver.clean = false;
                        }
                    }
                }
                driver.post(&mem, &bufs);
                req.notify
            }
            Op::Notify => true,
            Op::Scribble(s) => {
                s.apply(&mem);
                driver.clean = false;
                false
            }
            Op::ReadConfig { offset, len } => {
                let mut b = vec![0xffu8; usize::from(*len % 16)];
                blk.read_config(u64::from(*offset), &mut b);
                if u64::from(*offset) >= 60 {
                    assert!(b.iter().all(|&x| x == 0), "config past the end reads zero");
                }
                false
            }
            Op::Reset => {
                blk.reset();
                queues[0].reset();
                driver.reinit(&mem, qsize);
                driver.configure(&mut queues[0], input.event_idx);
                queues[0].validate(&mem).unwrap();
                false
            }
        };
        if !notify {
            continue;
        }
        match blk.queue_notify(0, &mut queues, &mem) {
            Ok(()) => {
                driver.collect_used(&mem);
                let _ = queues[0].needs_notification(&mem);
            }
            Err(_) => {
                // The transport would set DEVICE_NEEDS_RESET; the driver resets.
                blk.reset();
                queues[0].reset();
                driver.reinit(&mem, qsize);
                driver.configure(&mut queues[0], input.event_idx);
                queues[0].validate(&mem).unwrap();
            }
        }
    }
});
