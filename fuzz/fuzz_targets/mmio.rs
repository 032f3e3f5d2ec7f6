//! The virtio-mmio transport (`MmioTransport`) with a block device behind it: register
//! reads and writes at any offset and width in any order, Linux-like bring-ups with
//! fuzzed features and queue settings, chains posted and kicked, backend wake-ups,
//! interrupt acks and ring scribbles. Never panics; identity registers never change,
//! `DRIVER_OK` never stands without `FEATURES_OK`, the `InterruptStatus` register and
//! its lock-free handle agree, and a device that is not active raises no interrupt on a
//! kick or a backend wake-up.

#![no_main]

use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arbitrary::Arbitrary;
use devices::virtio::blk::Block;
use devices::virtio::mmio::{reg, status, MmioTransport};
use devices::virtio::GuestMemory;
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{
    guest_ram, queue_size, BlkLayout, CountIrq, DiskFaults, Driver, FakeDisk, Scribble, Shared,
};

/// Every register offset the transport knows, for `Offset::Known`.
const REGS: [u64; 26] = [
    reg::MAGIC,
    reg::VERSION,
    reg::DEVICE_ID,
    reg::VENDOR_ID,
    reg::DEVICE_FEATURES,
    reg::DEVICE_FEATURES_SEL,
    reg::DRIVER_FEATURES,
    reg::DRIVER_FEATURES_SEL,
    reg::QUEUE_SEL,
    reg::QUEUE_NUM_MAX,
    reg::QUEUE_NUM,
    reg::QUEUE_READY,
    reg::QUEUE_NOTIFY,
    reg::INTERRUPT_STATUS,
    reg::INTERRUPT_ACK,
    reg::STATUS,
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_DESC_HIGH,
    reg::QUEUE_DRIVER_LOW,
    reg::QUEUE_DRIVER_HIGH,
    reg::QUEUE_DEVICE_LOW,
    reg::QUEUE_DEVICE_HIGH,
    reg::SHM_LEN_LOW,
    reg::SHM_LEN_HIGH,
    reg::CONFIG_GENERATION,
    reg::CONFIG,
];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Offset {
    Known(u8),
    Config(u8),
    Raw(u64),
}

impl Offset {
    fn get(self) -> u64 {
        match self {
            Offset::Known(i) => REGS[usize::from(i) % REGS.len()],
            Offset::Config(o) => reg::CONFIG + u64::from(o),
            Offset::Raw(o) => o,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Width {
    W1,
    W2,
    W4,
    W8,
    Odd(u8),
}

impl Width {
    fn get(self) -> usize {
        match self {
            Width::W1 => 1,
            Width::W2 => 2,
            Width::W4 => 4,
            Width::W8 => 8,
            Width::Odd(n) => usize::from(n % 16),
        }
    }
}

/// The features a bring-up accepts.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Features {
    /// Everything offered (read from `DeviceFeatures`).
    Offered,
    /// Only `VERSION_1`.
    Version1,
    /// Some of what is offered, with `VERSION_1`.
    Some(u64),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Read {
        offset: Offset,
        width: Width,
    },
    Write {
        offset: Offset,
        width: Width,
        value: u64,
    },
    /// Linux's sequence: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queue 0 at
    /// the layout's rings, DRIVER_OK (each step possibly skipped).
    BringUp {
        features: Features,
        qsize: u8,
        skip: u8,
        ready: bool,
    },
    /// A block request (a header with `kind` and `sector` if given) on queue 0.
    Post {
        header: Option<(u8, u8)>,
        layout: BlkLayout,
    },
    Notify(u8),
    BackendReady,
    Ack(u32),
    Scribble(Scribble),
}

#[derive(Arbitrary, Debug)]
struct Input {
    sectors: u8,
    read_only: bool,
    discard: bool,
    faults: DiskFaults,
    ops: Vec<Op>,
    ram: Vec<u8>,
}

type T = MmioTransport<Block<FakeDisk>, Shared>;

fn r32(t: &T, off: u64) -> u32 {
    let mut b = [0; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut T, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn bring_up(t: &mut T, driver: &Driver, features: Features, skip: u8, ready: bool) {
    const VERSION_1: u64 = 1 << 32;
    w32(t, reg::DEVICE_FEATURES_SEL, 1);
    let mut offered = u64::from(r32(t, reg::DEVICE_FEATURES)) << 32;
    w32(t, reg::DEVICE_FEATURES_SEL, 0);
    offered |= u64::from(r32(t, reg::DEVICE_FEATURES));
    assert_ne!(offered & VERSION_1, 0, "VERSION_1 not offered");
    let features = match features {
        Features::Offered => offered,
        Features::Version1 => VERSION_1,
        Features::Some(f) => f & offered | VERSION_1,
        Features::Raw(f) => f,
    };
    let steps: [&dyn Fn(&mut T); 13] = [
        &|t| w32(t, reg::STATUS, 0),
        &|t| w32(t, reg::STATUS, status::ACKNOWLEDGE),
        &|t| w32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER),
        &|t| {
            w32(t, reg::DRIVER_FEATURES_SEL, 1);
            w32(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        },
        &|t| {
            w32(t, reg::DRIVER_FEATURES_SEL, 0);
            w32(t, reg::DRIVER_FEATURES, features as u32);
        },
        &|t| {
            w32(
                t,
                reg::STATUS,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            )
        },
        &|t| w32(t, reg::QUEUE_SEL, 0),
        &|t| w32(t, reg::QUEUE_NUM, u32::from(driver.dq.size)),
        &|t| w32(t, reg::QUEUE_DESC_LOW, driver.dq.desc as u32),
        &|t| w32(t, reg::QUEUE_DRIVER_LOW, driver.dq.avail as u32),
        &|t| w32(t, reg::QUEUE_DEVICE_LOW, driver.dq.used as u32),
        &|t| w32(t, reg::QUEUE_READY, u32::from(ready)),
        &|t| {
            w32(
                t,
                reg::STATUS,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            )
        },
    ];
    // `skip` names one step to leave out (most values leave none out).
    for (i, step) in steps.iter().enumerate() {
        if usize::from(skip) != i {
            step(t);
        }
    }
}

fuzz_target!(|input: Input| {
    let mem = Rc::new(guest_ram(&input.ram));
    let disk = FakeDisk {
        data: vec![0x5a; usize::from(input.sectors) * 512],
        faults: input.faults,
        discard: input.discard,
        read_only: input.read_only,
    };
    let irqs = Arc::new(AtomicUsize::new(0));
    let mut t: T = MmioTransport::new(
        Block::new(disk, input.read_only, b"fuzz"),
        Shared(mem.clone()),
        Box::new(CountIrq(irqs.clone())),
    );
    let isr = t.interrupt_status();
    let mut driver = Driver::new(0, 16);
    driver.clean = false; // raw register writes can point the queue anywhere

    for op in input.ops.iter().take(128) {
        let was_active = t.is_active();
        let irqs_before = irqs.load(Ordering::Relaxed);
        match op {
            Op::Read { offset, width } => {
                let mut b = vec![0xa5u8; width.get()];
                t.read(offset.get(), &mut b);
            }
            Op::Write {
                offset,
                width,
                value,
            } => {
                let b = value.to_le_bytes();
                let n = width.get().min(8);
                t.write(offset.get(), &b[..n]);
            }
            Op::BringUp {
                features,
                qsize,
                skip,
                ready,
            } => {
                let size = queue_size(*qsize, 256);
                driver.reinit(&*mem, size);
                driver.clean = false;
                bring_up(&mut t, &driver, *features, *skip, *ready);
            }
            Op::Post { header, layout } => {
                let bufs = layout.bufs();
                if let (Some((kind, sector)), Some(b)) = (header, bufs.first()) {
                    let kind = [0u32, 1, 4, 8, 11, 99][usize::from(kind % 6)];
                    let mut h = [0u8; 16];
                    h[0..4].copy_from_slice(&kind.to_le_bytes());
                    h[8..16].copy_from_slice(&u64::from(*sector).to_le_bytes());
                    let _ = mem.write(b.addr.get(), &h);
                }
                driver.post(&*mem, &bufs);
            }
            Op::Notify(i) => {
                if *i & 0x80 != 0 {
                    w32(&mut t, reg::QUEUE_NOTIFY, u32::from(*i & 0x7f));
                } else {
                    t.notify(usize::from(*i));
                }
            }
            Op::BackendReady => t.backend_ready(),
            Op::Ack(v) => w32(&mut t, reg::INTERRUPT_ACK, *v),
            Op::Scribble(s) => s.apply(&*mem),
        }
        // Invariants after every step.
        assert_eq!(r32(&t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r32(&t, reg::VERSION), 2);
        assert_eq!(r32(&t, reg::DEVICE_ID), 2);
        assert_eq!(r32(&t, reg::STATUS), t.status());
        let st = t.status();
        if st & status::DRIVER_OK != 0 {
            assert_ne!(
                st & status::FEATURES_OK,
                0,
                "DRIVER_OK without FEATURES_OK: {st:#x}"
            );
        }
        if !was_active && !t.is_active() && !matches!(op, Op::Write { .. } | Op::BringUp { .. }) {
            assert_eq!(
                irqs.load(Ordering::Relaxed),
                irqs_before,
                "an inactive device raised an interrupt"
            );
        }
        assert_eq!(r32(&t, reg::INTERRUPT_STATUS), isr.load(Ordering::SeqCst));
    }
});
