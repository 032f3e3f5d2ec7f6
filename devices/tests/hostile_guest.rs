//! Hostile-guest property tests: proptest-driven "fuzzing" of the device side of the
//! virtio core with guest input that no well-behaved driver would produce.
//!
//! Every property checks that the device code never panics, and that it touches guest
//! memory only where the spec lets it: it reads the rings and device-readable buffers
//! of chains it popped, and writes the used ring and device-writable buffers of chains
//! it popped. Guest RAM is a `Recorder` (a `VecMemory` that logs every successful
//! access and can check each one against that rule as it happens).
//!
//! 1. `split_virtqueue`: arbitrary queue sizes, ring addresses, descriptor tables and
//!    available rings, and a hostile driver scribbling over the rings between device
//!    steps, against `Queue::{validate, pop, add_used, needs_notification,
//!    enable_notification}` and chain `Reader`/`Writer` copies, compared with a model.
//! 2. `mmio_rng`, `mmio_block`: random register accesses (any offset, width 1/2/4/8,
//!    read or write), bring-ups, notifications and posted chains on `MmioTransport`.
//! 3. `blk_requests`: random virtio-blk requests, compared with a model of the device.
//! 4. `net_tx_rx`, `vsock_tx_rx`: random transmit chains (and receive chains) for
//!    virtio-net and virtio-vsock, with fake backends that check their contracts.
//!
//! The transport owns its memory, so the mmio properties give it `Shared`, a handle on
//! a `Recorder` (itself a `VecMemory`), instead of a bare `VecMemory`.
//!
//! Bugs these found (fixed in `blk.rs`; kept as regression tests):
//! `blk_disk_changes_only_when_ok` (the strict disk invariant, as a property) and the
//! minimal cases it and a review of `blk.rs` led to: `blk_discard_with_a_bad_second_segment_changes_nothing`,
//! `blk_out_with_an_unreadable_tail_changes_nothing`,
//! `blk_out_with_an_unreachable_status_byte_changes_nothing`,
//! `blk_4gib_read_reports_a_truncated_used_length`.
//!
//! Case counts: the defaults keep the whole file well under 30 s in a debug build; set
//! `HOSTILE_CASES=N` (or `PROPTEST_CASES=N`; proptest itself ignores it when a test
//! gives a config, so we read it here) for a longer run. Each property prints the
//! number of cases it ran straight to stderr (so it shows even with captured output).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Write as _;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use devices::virtio::blk::{self, BackendError, Block, BlockBackend, SECTOR_SIZE};
use devices::virtio::mem::VecMemory;
use devices::virtio::mmio::{reg, status, MmioTransport};
use devices::virtio::net::{self, Net, NetBackend, NetError};
use devices::virtio::queue::{Chain, Descriptor};
use devices::virtio::rng::{EntropyError, EntropySource, Rng};
use devices::virtio::testing::DriverQueue;
use devices::virtio::vsock::{self, PacketHeader, Vsock, VsockBackend};
use devices::virtio::{GuestMemory, Interrupt, MemError, Queue, VirtioDevice, INT_CONFIG};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::{TestCaseError, TestRunner};

// ---------------------------------------------------------------------------------------
// Running properties
// ---------------------------------------------------------------------------------------

fn cases(default: u32) -> u32 {
    ["HOSTILE_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
        .unwrap_or(default)
}

/// Run `test` on `cases` values of `strategy` (shrinking a failure), then print how many
/// cases ran. Failures are not persisted to files.
fn run_property<S>(
    name: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let config = ProptestConfig {
        cases: cases(default_cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let configured = config.cases;
    let ran = AtomicUsize::new(0);
    let start = std::time::Instant::now();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |v| {
        ran.fetch_add(1, Ordering::Relaxed);
        test(v)
    });
    let _ = writeln!(
        std::io::stderr(),
        "hostile_guest::{name}: {} cases run ({configured} configured, the rest is shrinking) in {:.1?}: {}\n  coverage: {}",
        ran.load(Ordering::Relaxed),
        start.elapsed(),
        if result.is_ok() { "ok" } else { "FAILED" },
        Some(stats_for(name)).filter(|s| !s.is_empty()).unwrap_or_else(|| "-".into()),
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

/// Coverage counters (`"property.event"`), printed after each property so a run shows
/// that the generators reach the interesting paths.
fn hit(event: &'static str) {
    static_stats()
        .lock()
        .unwrap()
        .entry(event)
        .and_modify(|n| *n += 1)
        .or_insert(1);
}

fn static_stats() -> &'static Mutex<std::collections::BTreeMap<&'static str, usize>> {
    static STATS: OnceLock<Mutex<std::collections::BTreeMap<&'static str, usize>>> =
        OnceLock::new();
    STATS.get_or_init(Default::default)
}

fn stats_for(name: &str) -> String {
    let prefix = format!("{name}.");
    static_stats()
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn fail(msg: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(msg.into())
}

fn same_bytes(what: &str, got: &[u8], want: &[u8]) -> Result<(), TestCaseError> {
    if got.len() != want.len() {
        return Err(fail(format!(
            "{what}: {} bytes, expected {}",
            got.len(),
            want.len()
        )));
    }
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        return Err(fail(format!(
            "{what}: byte {i} of {} is {:#x}, expected {:#x}",
            got.len(),
            got[i],
            want[i]
        )));
    }
    Ok(())
}

/// Deterministic filler bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// 256 KiB of filler, made once.
fn ram_fill() -> &'static [u8] {
    static FILL: OnceLock<Vec<u8>> = OnceLock::new();
    FILL.get_or_init(|| pattern(0x4_0000, 7))
}

// ---------------------------------------------------------------------------------------
// Guest memory that records and polices every access
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Access {
    Read(u64, u64),
    Write(u64, Vec<u8>),
}

/// Whether `[addr, addr + len)` lies inside one of `regions` (`(start, len)` pairs).
fn within(regions: &[(u64, u64)], addr: u64, len: u64) -> bool {
    regions.iter().any(|&(a, l)| {
        addr >= a && u128::from(addr) + u128::from(len) <= u128::from(a) + u128::from(l)
    })
}

/// What a device may touch: the rings of its (validated) queues, and the buffers of the
/// descriptors it has read from a descriptor table (learned as it reads them).
#[derive(Debug, Default)]
struct Policy {
    desc_tables: Vec<(u64, u64)>,
    avail_rings: Vec<(u64, u64)>,
    used_rings: Vec<(u64, u64)>,
    writable: Vec<(u64, u64)>,
    readable: Vec<(u64, u64)>,
    violations: Vec<String>,
}

impl Policy {
    /// `(desc_table, avail_ring, used_ring, size)` of each queue in use.
    fn for_queues(queues: &[(u64, u64, u64, u16)]) -> Self {
        let mut p = Policy::default();
        for &(desc, avail, used, size) in queues {
            let n = u64::from(size);
            p.desc_tables.push((desc, 16 * n));
            p.avail_rings.push((avail, 6 + 2 * n));
            p.used_rings.push((used, 6 + 8 * n));
        }
        p
    }

    fn on_read(&mut self, addr: u64, data: &[u8]) {
        let len = data.len() as u64;
        if !(within(&self.desc_tables, addr, len)
            || within(&self.avail_rings, addr, len)
            || within(&self.readable, addr, len))
        {
            self.violations.push(format!(
                "read {addr:#x}+{len:#x}: not a ring, not a device-readable buffer"
            ));
        }
        if data.len() == 16 {
            let is_desc = self
                .desc_tables
                .iter()
                .any(|&(t, l)| within(&[(t, l)], addr, 16) && (addr - t).is_multiple_of(16));
            if is_desc {
                let baddr = u64::from_le_bytes(data[0..8].try_into().unwrap());
                let blen = u64::from(u32::from_le_bytes(data[8..12].try_into().unwrap()));
                let flags = u16::from_le_bytes(data[12..14].try_into().unwrap());
                if flags & 2 != 0 {
                    self.writable.push((baddr, blen));
                } else {
                    self.readable.push((baddr, blen));
                }
            }
        }
    }

    fn on_write(&mut self, addr: u64, len: u64) {
        if !(within(&self.used_rings, addr, len) || within(&self.writable, addr, len)) {
            self.violations.push(format!(
                "write {addr:#x}+{len:#x}: not a used ring, not a device-writable buffer"
            ));
        }
    }
}

/// Guest RAM for the device under test. The test's own (driver-side) accesses go to
/// `inner` directly and are neither logged nor policed.
struct Recorder {
    inner: VecMemory,
    base: u64,
    size: u64,
    log: RefCell<Vec<Access>>,
    policy: RefCell<Option<Policy>>,
}

impl Recorder {
    fn new(base: u64, size: u64) -> Self {
        Recorder {
            inner: VecMemory::new(base, size as usize),
            base,
            size,
            log: RefCell::new(Vec::new()),
            policy: RefCell::new(None),
        }
    }

    fn take_log(&self) -> Vec<Access> {
        std::mem::take(&mut *self.log.borrow_mut())
    }

    fn poke(&self, addr: u64, bytes: &[u8]) {
        let _ = self.inner.write(addr, bytes);
    }

    fn peek(&self, addr: u64, len: u64) -> Option<Vec<u8>> {
        let mut b = vec![0; usize::try_from(len).ok()?];
        self.inner.read(addr, &mut b).ok()?;
        Some(b)
    }

    fn peek_u16(&self, addr: u64) -> Option<u16> {
        self.inner.load_u16(addr).ok()
    }

    fn set_policy(&self, p: Option<Policy>) {
        *self.policy.borrow_mut() = p;
    }

    fn violations(&self) -> Vec<String> {
        self.policy
            .borrow_mut()
            .as_mut()
            .map(|p| std::mem::take(&mut p.violations))
            .unwrap_or_default()
    }

    /// Fail on any access the policy refused since the last call.
    fn check_policy(&self, what: &str) -> Result<(), TestCaseError> {
        let v = self.violations();
        if v.is_empty() {
            Ok(())
        } else {
            Err(fail(format!(
                "{what}: {} bad accesses, first: {}",
                v.len(),
                v[0]
            )))
        }
    }

    fn in_ram(&self, addr: u64, len: u64) -> bool {
        addr >= self.base
            && u128::from(addr) + u128::from(len) <= u128::from(self.base) + u128::from(self.size)
    }
}

impl GuestMemory for Recorder {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.inner.read(addr, buf)?;
        if !buf.is_empty() {
            assert!(
                self.in_ram(addr, buf.len() as u64),
                "VecMemory let a read out of RAM"
            );
            self.log
                .borrow_mut()
                .push(Access::Read(addr, buf.len() as u64));
            if let Some(p) = self.policy.borrow_mut().as_mut() {
                p.on_read(addr, buf);
            }
        }
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.inner.write(addr, buf)?;
        if !buf.is_empty() {
            assert!(
                self.in_ram(addr, buf.len() as u64),
                "VecMemory let a write out of RAM"
            );
            self.log
                .borrow_mut()
                .push(Access::Write(addr, buf.to_vec()));
            if let Some(p) = self.policy.borrow_mut().as_mut() {
                p.on_write(addr, buf.len() as u64);
            }
        }
        Ok(())
    }

    fn check_range(&self, addr: u64, len: u64) -> bool {
        self.inner.check_range(addr, len)
    }
}

/// A `Recorder` the test keeps a handle on while a transport owns "the" memory.
#[derive(Clone)]
struct Shared(Rc<Recorder>);

impl GuestMemory for Shared {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.0.write(addr, buf)
    }
    fn check_range(&self, addr: u64, len: u64) -> bool {
        self.0.check_range(addr, len)
    }
}

// ---------------------------------------------------------------------------------------
// Chain streams (the model's view of Reader/Writer)
// ---------------------------------------------------------------------------------------

fn total_len(descs: &[Descriptor]) -> u64 {
    descs.iter().map(|d| u64::from(d.len)).sum()
}

fn split_chain(descs: &[Descriptor]) -> (Vec<Descriptor>, Vec<Descriptor>) {
    let n = descs.iter().take_while(|d| !d.writable).count();
    (descs[..n].to_vec(), descs[n..].to_vec())
}

fn ranges(descs: &[Descriptor]) -> Vec<(u64, u64)> {
    descs.iter().map(|d| (d.addr, u64::from(d.len))).collect()
}

/// The guest ranges that bytes `[start, start + n)` of the stream over `descs` occupy, in
/// order, zero-length parts left out; the address is `None` where it overflows.
fn segments(descs: &[Descriptor], start: u64, n: u64) -> Vec<(Option<u64>, u64)> {
    let end = start + n;
    let mut out = Vec::new();
    let mut pos = 0u64;
    for d in descs {
        if pos >= end {
            break;
        }
        let (lo, hi) = (pos, pos + u64::from(d.len));
        pos = hi;
        let (a, b) = (start.max(lo), end.min(hi));
        if a < b {
            out.push((d.addr.checked_add(a - lo), b - a));
        }
    }
    out
}

/// Bytes `[start, start + n)` of the stream, if all of them are in guest RAM.
fn stream_read(mem: &Recorder, descs: &[Descriptor], start: u64, n: u64) -> Option<Vec<u8>> {
    if start.checked_add(n)? > total_len(descs) {
        return None;
    }
    let mut out = Vec::with_capacity(n as usize);
    for (addr, len) in segments(descs, start, n) {
        out.extend(mem.peek(addr?, len)?);
    }
    Some(out)
}

fn stream_in_ram(mem: &Recorder, descs: &[Descriptor], start: u64, n: u64) -> bool {
    start.checked_add(n).is_some_and(|e| e <= total_len(descs))
        && segments(descs, start, n)
            .iter()
            .all(|&(a, l)| a.is_some_and(|a| mem.check_range(a, l)))
}

/// Coalesce a sequence of writes into runs of consecutive addresses.
fn merge(parts: impl IntoIterator<Item = (u64, Vec<u8>)>) -> Vec<(u64, Vec<u8>)> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    for (a, d) in parts {
        if d.is_empty() {
            continue;
        }
        if let Some((la, ld)) = out.last_mut() {
            if la.checked_add(ld.len() as u64) == Some(a) {
                ld.extend_from_slice(&d);
                continue;
            }
        }
        out.push((a, d));
    }
    out
}

fn same_writes(
    what: &str,
    got: &[(u64, Vec<u8>)],
    want: &[(u64, Vec<u8>)],
) -> Result<(), TestCaseError> {
    if got.len() != want.len() {
        return Err(fail(format!(
            "{what}: {} write runs, expected {} (got at {:x?}, expected at {:x?})",
            got.len(),
            want.len(),
            got.iter().map(|w| (w.0, w.1.len())).collect::<Vec<_>>(),
            want.iter().map(|w| (w.0, w.1.len())).collect::<Vec<_>>(),
        )));
    }
    for ((ga, gd), (wa, wd)) in got.iter().zip(want) {
        if ga != wa {
            return Err(fail(format!(
                "{what}: a write at {ga:#x}, expected at {wa:#x}"
            )));
        }
        same_bytes(what, gd, wd)?;
    }
    Ok(())
}

fn writes_of(log: &[Access]) -> Vec<(u64, Vec<u8>)> {
    log.iter()
        .filter_map(|a| match a {
            Access::Write(addr, d) => Some((*addr, d.clone())),
            Access::Read(..) => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Shared strategies
// ---------------------------------------------------------------------------------------

/// A buffer address (as an offset from the RAM base, wrapping): mostly in the data area
/// `[data, ram)`, sometimes straddling the end of RAM, anywhere, near the top of the
/// address space, or (with `rings`) over the rings.
fn buf_addr(ram: u64, data: u64, rings: bool) -> BoxedStrategy<u64> {
    let mut v: Vec<(u32, BoxedStrategy<u64>)> = vec![
        (8, (data..ram).boxed()),
        (1, (ram - 0x100..ram + 0x100).boxed()),
        (1, any::<u64>().boxed()),
        (1, (u64::MAX - 0x100..=u64::MAX).boxed()),
    ];
    if rings {
        v.push((1, (0..data).boxed()));
    }
    Union::new_weighted(v).boxed()
}

fn buf_len() -> BoxedStrategy<u32> {
    prop_oneof![
        4 => 0u32..64,
        2 => 0u32..0x1000,
        1 => 0u32..0x2_0000,
        1 => any::<u32>(),
        1 => u32::MAX - 16..=u32::MAX,
    ]
    .boxed()
}

/// A posted chain: `(addr, len, device_writable)` buffers, device-readable ones first
/// unless `sorted` is false.
fn chain_bufs(ram: u64, data: u64, max: usize) -> BoxedStrategy<Vec<(u64, u32, bool)>> {
    (
        vec(
            (buf_addr(ram, data, false), buf_len(), any::<bool>()),
            1..=max,
        ),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(mut bufs, sorted)| {
            if sorted {
                bufs.sort_by_key(|b| b.2);
            }
            bufs
        })
        .boxed()
}

fn ordered(bufs: &[(u64, u32, bool)]) -> bool {
    !bufs.windows(2).any(|w| w[0].2 && !w[1].2)
}

fn as_descs(bufs: &[(u64, u32, bool)]) -> Vec<Descriptor> {
    bufs.iter()
        .map(|&(addr, len, writable)| Descriptor {
            addr,
            len,
            writable,
        })
        .collect()
}

/// The checker itself: a device that read a descriptor may write its buffer only if the
/// descriptor is device-writable, and may read nothing it was not shown.
#[test]
fn the_policy_catches_stray_accesses() {
    let mem = Recorder::new(0, 0x1_0000);
    let dq = DriverQueue::new(4, 0);
    mem.set_policy(Some(Policy::for_queues(&[(dq.desc, dq.avail, dq.used, 4)])));
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&0x8000u64.to_le_bytes());
    raw[8..12].copy_from_slice(&16u32.to_le_bytes()); // device-readable
    mem.poke(dq.desc, &raw);
    let mut b = [0u8; 16];
    mem.read(dq.desc, &mut b).unwrap(); // the device reads descriptor 0
    mem.read(0x8000, &mut b).unwrap(); // and its buffer: fine
    assert!(mem.violations().is_empty());
    mem.write(0x8000, &[1]).unwrap(); // a device-readable buffer
    mem.write(dq.used + 2, &[1, 0]).unwrap(); // the used ring: fine
    mem.read(0x9000, &mut b).unwrap(); // never shown
    let v = mem.violations();
    assert_eq!(v.len(), 2, "{v:?}");
    raw[12] = 2; // now device-writable
    mem.poke(dq.desc + 16, &raw);
    mem.read(dq.desc + 16, &mut b).unwrap();
    mem.write(0x8008, &[0; 8]).unwrap();
    mem.write(0x8008, &[0; 9]).unwrap(); // one byte past the buffer
    assert_eq!(mem.violations().len(), 1);
}

// =======================================================================================
// 1. The split virtqueue
// =======================================================================================

const Q_RAM: u64 = 0x1_0000;
const Q_DATA: u64 = 0x4000;

#[derive(Debug, Clone)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
    /// Take `next` modulo the queue size (else as is).
    next_in_range: bool,
}

#[derive(Debug, Clone)]
enum Piece {
    Data(u32),
    Skip(u64),
}

#[derive(Debug, Clone)]
enum QOp {
    Pop,
    Read {
        chain: usize,
        pieces: Vec<u32>,
    },
    Write {
        chain: usize,
        pieces: Vec<Piece>,
    },
    AddUsed {
        chain: Option<usize>,
        head: u16,
        len: u32,
    },
    NeedsNotification,
    EnableNotification,
    SetEventIdx(bool),
    /// The driver writes `bytes` into region 0 (descriptors), 1 (avail), 2 (used), 3 (anywhere).
    Scribble {
        region: u8,
        off: u16,
        bytes: Vec<u8>,
    },
    /// The driver moves the available index on by this much.
    BumpAvail(u16),
}

#[derive(Debug, Clone)]
struct QueueCase {
    base: u64,
    max_log2: u8,
    size: u16,
    desc_off: u64,
    avail_off: u64,
    used_off: u64,
    descs: Vec<RawDesc>,
    avail_flags: u16,
    /// Taken modulo `size + 1` when the flag is set (else as is).
    avail_idx: (u16, bool),
    ring: Vec<(u16, bool)>,
    used_event: u16,
    event_idx: bool,
    ops: Vec<QOp>,
}

fn ring_off(default: u64, align: u64) -> BoxedStrategy<u64> {
    prop_oneof![
        8 => Just(default),
        2 => (0u64..Q_RAM / align).prop_map(move |k| k * align),
        1 => 0u64..Q_RAM + 64,
        1 => any::<u64>(),
    ]
    .boxed()
}

fn raw_desc() -> BoxedStrategy<RawDesc> {
    let flags = prop_oneof![
        6 => prop::sample::select(vec![0u16, 1, 2, 3]),
        1 => 0u16..8,
        1 => any::<u16>(),
    ];
    (
        buf_addr(Q_RAM, Q_DATA, true),
        buf_len(),
        flags,
        any::<u16>(),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(addr, len, flags, next, next_in_range)| RawDesc {
            addr,
            len,
            flags,
            next,
            next_in_range,
        })
        .boxed()
}

fn q_op() -> BoxedStrategy<QOp> {
    let piece_len = || prop_oneof![4 => 0u32..64, 2 => 0u32..0x1000, 1 => 0u32..0x1_1000];
    let piece = prop_oneof![
        3 => piece_len().prop_map(Piece::Data),
        1 => prop_oneof![0u64..64, any::<u64>()].prop_map(Piece::Skip),
    ];
    prop_oneof![
        6 => Just(QOp::Pop),
        3 => (any::<usize>(), vec(piece_len(), 1..4)).prop_map(|(chain, pieces)| QOp::Read { chain, pieces }),
        3 => (any::<usize>(), vec(piece, 1..4)).prop_map(|(chain, pieces)| QOp::Write { chain, pieces }),
        3 => (any::<bool>(), any::<usize>(), any::<u16>(), any::<u32>()).prop_map(|(own, c, head, len)| QOp::AddUsed {
            chain: own.then_some(c),
            head,
            len
        }),
        2 => Just(QOp::NeedsNotification),
        2 => Just(QOp::EnableNotification),
        1 => any::<bool>().prop_map(QOp::SetEventIdx),
        2 => (0u8..4, any::<u16>(), vec(any::<u8>(), 1..16)).prop_map(|(region, off, bytes)| QOp::Scribble {
            region,
            off,
            bytes
        }),
        2 => prop_oneof![1u16..=4, any::<u16>()].prop_map(QOp::BumpAvail),
    ]
    .boxed()
}

fn queue_case() -> impl Strategy<Value = QueueCase> {
    let base = prop::sample::select(vec![0u64, 0x8000_0000, 0u64.wrapping_sub(Q_RAM)]);
    let size = prop_oneof![
        8 => (0u32..=4).prop_map(|k| 1u16 << k),
        3 => (5u32..=8).prop_map(|k| 1u16 << k),
        1 => any::<u16>(),
    ];
    let max_log2 = prop_oneof![3 => Just(8u8), 1 => 0u8..=8];
    let avail_idx = (any::<u16>(), prop::bool::weighted(0.8));
    let ring = vec((any::<u16>(), prop::bool::weighted(0.9)), 1..=32);
    (
        (base, max_log2, size),
        (ring_off(0, 16), ring_off(0x1000, 2), ring_off(0x2000, 4)),
        vec(raw_desc(), 1..=32),
        (any::<u16>(), avail_idx, ring, any::<u16>(), any::<bool>()),
        vec(q_op(), 0..40),
    )
        .prop_map(
            |(
                (base, max_log2, size),
                (desc_off, avail_off, used_off),
                descs,
                (avail_flags, avail_idx, ring, used_event, event_idx),
                ops,
            )| {
                QueueCase {
                    base,
                    max_log2,
                    size,
                    desc_off,
                    avail_off,
                    used_off,
                    descs,
                    avail_flags,
                    avail_idx,
                    ring,
                    used_event,
                    event_idx,
                    ops,
                }
            },
        )
}

/// The device's queue next to the model of what it should do.
struct QRig {
    mem: Recorder,
    q: Queue,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
    signalled: Option<u16>,
    chains: Vec<Chain>,
    dead: bool,
    writes: u64,
}

impl QRig {
    fn n(&self) -> u64 {
        u64::from(self.size)
    }

    fn u16_at(&self, addr: u64) -> u16 {
        self.mem.peek_u16(addr).expect("a validated ring is in RAM")
    }

    fn avail_ring(&self) -> (u64, u64) {
        (self.avail, 6 + 2 * self.n())
    }

    /// What `pop` should return: virtio 1.x §2.7 plus the documented refusals.
    fn model_pop(&mut self) -> Result<Option<Chain>, &'static str> {
        let idx = self.u16_at(self.avail + 2);
        let pending = idx.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err("available index too far ahead");
        }
        let head = self.u16_at(self.avail + 4 + 2 * u64::from(self.next_avail % self.size));
        self.next_avail = self.next_avail.wrapping_add(1);
        let mut descs = Vec::new();
        let mut i = head;
        let mut writable_seen = false;
        loop {
            if i >= self.size {
                return Err("descriptor index out of range");
            }
            if descs.len() == usize::from(self.size) {
                return Err("chain longer than the queue");
            }
            let raw = self.mem.peek(self.desc + 16 * u64::from(i), 16).unwrap();
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            if flags & 4 != 0 {
                return Err("indirect");
            }
            let writable = flags & 2 != 0;
            if writable_seen && !writable {
                return Err("readable after writable");
            }
            writable_seen |= writable;
            descs.push(Descriptor {
                addr: u64::from_le_bytes(raw[0..8].try_into().unwrap()),
                len: u32::from_le_bytes(raw[8..12].try_into().unwrap()),
                writable,
            });
            if flags & 1 == 0 {
                return Ok(Some(Chain { head, descs }));
            }
            i = u16::from_le_bytes([raw[14], raw[15]]);
        }
    }

    fn pop(&mut self) -> Result<(), TestCaseError> {
        let want = self.model_pop();
        let got = self.q.pop(&self.mem);
        let tables = [(self.desc, 16 * self.n()), self.avail_ring()];
        for a in self.mem.take_log() {
            match a {
                Access::Write(addr, d) => {
                    return Err(fail(format!("pop wrote {addr:#x}+{:#x}", d.len())))
                }
                Access::Read(addr, len) => prop_assert!(
                    within(&tables, addr, len),
                    "pop read {:#x}+{:#x}",
                    addr,
                    len
                ),
            }
        }
        match (got, want) {
            (Ok(None), Ok(None)) => hit("split_virtqueue.pop_none"),
            (Ok(Some(c)), Ok(Some(w))) => {
                hit("split_virtqueue.pop_chain");
                if c.descs.len() > 1 {
                    hit("split_virtqueue.pop_multi");
                }
                prop_assert_eq!(&c, &w);
                prop_assert!(
                    !c.descs.is_empty() && c.descs.len() <= usize::from(self.size),
                    "chain of {} in a queue of {}",
                    c.descs.len(),
                    self.size
                );
                prop_assert!(c.head < self.size);
                prop_assert!(!c.descs.windows(2).any(|w| w[0].writable && !w[1].writable));
                self.chains.push(c);
            }
            (Err(_), Err(e)) => {
                hit(match e {
                    "available index too far ahead" => "split_virtqueue.err_avail",
                    "descriptor index out of range" => "split_virtqueue.err_index",
                    "chain longer than the queue" => "split_virtqueue.err_loop",
                    "indirect" => "split_virtqueue.err_indirect",
                    _ => "split_virtqueue.err_order",
                });
                self.dead = true
            }
            (g, w) => return Err(fail(format!("pop returned {g:?}; expected {w:?}"))),
        }
        Ok(())
    }

    fn read(&mut self, ch: &Chain, pieces: &[u32]) -> Result<(), TestCaseError> {
        let (rd, _) = split_chain(&ch.descs);
        let bufs = ranges(&rd);
        let total = total_len(&rd);
        let mut r = ch.reader();
        prop_assert_eq!(r.remaining(), total);
        let mut pos = 0;
        for &n in pieces {
            let k = u64::from(n).min(total - pos);
            let want = stream_read(&self.mem, &rd, pos, k);
            let mut buf = vec![0u8; n as usize];
            let got = r.read(&self.mem, &mut buf);
            for a in self.mem.take_log() {
                match a {
                    Access::Write(addr, _) => {
                        return Err(fail(format!("Reader wrote at {addr:#x}")))
                    }
                    Access::Read(addr, len) => prop_assert!(
                        within(&bufs, addr, len),
                        "Reader read {:#x}+{:#x} outside its buffers",
                        addr,
                        len
                    ),
                }
            }
            match (got, want) {
                (Ok(m), Some(bytes)) => {
                    if m > 0 {
                        hit("split_virtqueue.read_bytes");
                    }
                    prop_assert_eq!(m as u64, k);
                    same_bytes("Reader::read", &buf[..m], &bytes)?;
                    pos += k;
                    prop_assert_eq!(r.remaining(), total - pos);
                }
                (Err(_), None) => {
                    hit("split_virtqueue.read_refused");
                    break;
                }
                (g, w) => {
                    return Err(fail(format!(
                        "Reader::read({n}) gave {g:?}, expected {:?}",
                        w.map(|b| b.len())
                    )))
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, ch: &Chain, pieces: &[Piece]) -> Result<(), TestCaseError> {
        let (_, wr) = split_chain(&ch.descs);
        let total = total_len(&wr);
        let mut w = ch.writer();
        prop_assert_eq!(w.remaining(), total);
        let mut pos = 0;
        let mut written = 0u64;
        for p in pieces {
            match *p {
                Piece::Data(n) => {
                    self.writes += 1;
                    let data = pattern(n as usize, self.writes);
                    let k = u64::from(n).min(total - pos);
                    let mut want = Vec::new();
                    let mut ok = true;
                    let mut off = 0usize;
                    for (addr, len) in segments(&wr, pos, k) {
                        match addr {
                            Some(a) if self.mem.check_range(a, len) => {
                                want.push((a, data[off..off + len as usize].to_vec()));
                                off += len as usize;
                            }
                            _ => {
                                ok = false;
                                break;
                            }
                        }
                    }
                    let got = w.write(&self.mem, &data);
                    let log = self.mem.take_log();
                    prop_assert!(
                        log.iter().all(|a| matches!(a, Access::Write(..))),
                        "Writer read guest memory"
                    );
                    same_writes("Writer::write", &merge(writes_of(&log)), &merge(want))?;
                    match (got, ok) {
                        (Ok(m), true) => {
                            if m > 0 {
                                hit("split_virtqueue.write_bytes");
                            }
                            prop_assert_eq!(m as u64, k);
                            pos += k;
                            written += k;
                        }
                        (Err(_), false) => {
                            hit("split_virtqueue.write_refused");
                            break;
                        }
                        (g, _) => {
                            return Err(fail(format!(
                                "Writer::write({n}) gave {g:?}, expected ok: {ok}"
                            )))
                        }
                    }
                }
                Piece::Skip(n) => {
                    let k = n.min(total - pos);
                    w.skip(n);
                    prop_assert!(self.mem.take_log().is_empty(), "skip touched memory");
                    pos += k;
                    written += k;
                }
            }
            prop_assert_eq!(u64::from(w.written()), written.min(u64::from(u32::MAX)));
            prop_assert_eq!(w.remaining(), total - pos);
        }
        Ok(())
    }

    fn add_used(&mut self, head: u16, len: u32) -> Result<(), TestCaseError> {
        let elem = self.used + 4 + 8 * u64::from(self.next_used % self.size);
        let r = self.q.add_used(&self.mem, head, len);
        prop_assert!(r.is_ok(), "add_used on a valid ring: {:?}", r);
        self.next_used = self.next_used.wrapping_add(1);
        for a in self.mem.take_log() {
            match a {
                Access::Read(addr, _) => return Err(fail(format!("add_used read {addr:#x}"))),
                Access::Write(addr, d) => prop_assert!(
                    within(&[(elem, 8), (self.used + 2, 2)], addr, d.len() as u64),
                    "add_used wrote {:#x}+{:#x}",
                    addr,
                    d.len()
                ),
            }
        }
        let mut want = u32::from(head).to_le_bytes().to_vec();
        want.extend(len.to_le_bytes());
        prop_assert_eq!(self.mem.peek(elem, 8).unwrap(), want);
        prop_assert_eq!(self.u16_at(self.used + 2), self.next_used);
        Ok(())
    }

    fn needs_notification(&mut self) -> Result<(), TestCaseError> {
        let new = self.next_used;
        let want = if self.signalled == Some(new) {
            false
        } else {
            let notify = if self.event_idx {
                let event = self.u16_at(self.avail + 4 + 2 * self.n());
                match self.signalled {
                    // vring_need_event(), virtio 1.x §2.7.10.
                    Some(old) => new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old),
                    None => true,
                }
            } else {
                self.u16_at(self.avail) & 1 == 0
            };
            self.signalled = Some(new);
            notify
        };
        let got = self.q.needs_notification(&self.mem);
        let ring = [self.avail_ring()];
        for a in self.mem.take_log() {
            match a {
                Access::Write(addr, _) => {
                    return Err(fail(format!("needs_notification wrote {addr:#x}")))
                }
                Access::Read(addr, len) => prop_assert!(within(&ring, addr, len)),
            }
        }
        prop_assert_eq!(got, Ok(want));
        Ok(())
    }

    fn enable_notification(&mut self) -> Result<(), TestCaseError> {
        let got = self.q.enable_notification(&self.mem);
        let avail_event = self.used + 4 + 8 * self.n();
        let log = self.mem.take_log();
        let ring = [self.avail_ring()];
        for a in &log {
            if let Access::Read(addr, len) = *a {
                prop_assert!(within(&ring, addr, len));
            }
        }
        let want_writes = if self.event_idx {
            vec![(avail_event, self.next_avail.to_le_bytes().to_vec())]
        } else {
            vec![]
        };
        same_writes("enable_notification", &merge(writes_of(&log)), &want_writes)?;
        prop_assert_eq!(got, Ok(self.u16_at(self.avail + 2) != self.next_avail));
        Ok(())
    }
}

fn queue_property(c: QueueCase) -> Result<(), TestCaseError> {
    let mem = Recorder::new(c.base, Q_RAM);
    let at = |off: u64| c.base.wrapping_add(off);
    let (desc, avail, used) = (at(c.desc_off), at(c.avail_off), at(c.used_off));
    let size = c.size;
    let n = usize::from(size).min(256);
    let in_range = |v: u16, yes: bool| if yes && size > 0 { v % size } else { v };
    // Lay out the driver's side: descriptor table, then the available ring over it.
    for i in 0..n {
        let d = &c.descs[i % c.descs.len()];
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&at(d.addr).to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&in_range(d.next, d.next_in_range).to_le_bytes());
        mem.poke(desc.wrapping_add(16 * i as u64), &raw);
    }
    mem.poke(avail, &c.avail_flags.to_le_bytes());
    let avail_idx = match c.avail_idx {
        (v, true) => (u32::from(v) % (u32::from(size) + 1)) as u16,
        (v, false) => v,
    };
    mem.poke(avail.wrapping_add(2), &avail_idx.to_le_bytes());
    for i in 0..n {
        let (h, yes) = c.ring[i % c.ring.len()];
        mem.poke(
            avail.wrapping_add(4 + 2 * i as u64),
            &in_range(h, yes).to_le_bytes(),
        );
    }
    mem.poke(
        avail.wrapping_add(4 + 2 * u64::from(size)),
        &c.used_event.to_le_bytes(),
    );

    let max = 1u16 << c.max_log2;
    let mut q = Queue::new(max);
    q.size = size;
    q.desc_table = desc;
    q.avail_ring = avail;
    q.used_ring = used;
    q.ready = true;
    q.set_event_idx(c.event_idx);
    let valid = q.validate(&mem);
    let nn = u64::from(size);
    let want_valid = size != 0
        && size.is_power_of_two()
        && size <= max
        && [
            (desc, 16, 16 * nn),
            (avail, 2, 6 + 2 * nn),
            (used, 4, 6 + 8 * nn),
        ]
        .iter()
        .all(|&(a, align, len)| a % align == 0 && mem.check_range(a, len));
    prop_assert_eq!(valid.is_ok(), want_valid, "validate() said {:?}", valid);
    prop_assert!(mem.take_log().is_empty(), "validate touched guest memory");
    hit(if valid.is_ok() {
        "split_virtqueue.valid"
    } else {
        "split_virtqueue.invalid"
    });
    if valid.is_err() {
        // Nothing may use an invalid queue (the transport marks the device NEEDS_RESET).
        return Ok(());
    }

    let mut rig = QRig {
        mem,
        q,
        size,
        desc,
        avail,
        used,
        next_avail: 0,
        next_used: 0,
        event_idx: c.event_idx,
        signalled: None,
        chains: Vec::new(),
        dead: false,
        writes: 0,
    };
    for op in &c.ops {
        // After a QueueError the transport stops using the queue; so do we, except for
        // the driver's scribbling.
        let device_op = !matches!(op, QOp::Scribble { .. } | QOp::BumpAvail(_));
        if rig.dead && device_op {
            continue;
        }
        match op {
            QOp::Pop => rig.pop()?,
            QOp::Read { chain, pieces } => {
                if let Some(ch) = rig.chains.get(chain % rig.chains.len().max(1)).cloned() {
                    rig.read(&ch, pieces)?;
                }
            }
            QOp::Write { chain, pieces } => {
                if let Some(ch) = rig.chains.get(chain % rig.chains.len().max(1)).cloned() {
                    rig.write(&ch, pieces)?;
                }
            }
            QOp::AddUsed { chain, head, len } => {
                let head = match chain {
                    Some(i) if !rig.chains.is_empty() => rig.chains[i % rig.chains.len()].head,
                    _ => *head,
                };
                rig.add_used(head, *len)?;
            }
            QOp::NeedsNotification => rig.needs_notification()?,
            QOp::EnableNotification => rig.enable_notification()?,
            QOp::SetEventIdx(on) => {
                rig.q.set_event_idx(*on);
                rig.event_idx = *on;
            }
            QOp::Scribble { region, off, bytes } => {
                let off = u64::from(*off);
                let addr = match region {
                    0 => desc + off % (16 * nn),
                    1 => avail + off % (6 + 2 * nn),
                    2 => used + off % (6 + 8 * nn),
                    _ => c.base.wrapping_add(off % Q_RAM),
                };
                let room = (c.base.wrapping_add(Q_RAM).wrapping_sub(addr)).min(bytes.len() as u64)
                    as usize;
                rig.mem.poke(addr, &bytes[..room]);
            }
            QOp::BumpAvail(d) => {
                let idx = rig.u16_at(avail + 2).wrapping_add(*d);
                rig.mem.poke(avail + 2, &idx.to_le_bytes());
            }
        }
    }
    // With the index standing still, popping ends within `size` chains.
    let mut popped = 0u32;
    let mut ended = rig.dead;
    while !ended && popped <= u32::from(size) {
        let before = rig.chains.len();
        rig.pop()?;
        if rig.dead || rig.chains.len() == before {
            ended = true;
        } else {
            popped += 1;
        }
    }
    prop_assert!(
        ended && popped <= u32::from(size),
        "popped {} chains from a queue of {} without end",
        popped,
        size
    );
    Ok(())
}

#[test]
fn split_virtqueue() {
    run_property("split_virtqueue", 4000, queue_case(), queue_property);
}

// =======================================================================================
// 2. The mmio transport
// =======================================================================================

const M_RAM: u64 = 0x4_0000;
const M_DATA: u64 = 0x1_0000;

struct CountIrq(Arc<AtomicUsize>);

impl Interrupt for CountIrq {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Counter(u8);

impl EntropySource for Counter {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
        for b in buf {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
        Ok(())
    }
}

/// An in-memory disk the test can look at while the device owns it. It fails the test
/// (by panicking) if the device ever asks for bytes past its end.
#[derive(Clone)]
struct MemDisk {
    data: Arc<Mutex<Vec<u8>>>,
    can_discard: bool,
    flushes: Arc<AtomicUsize>,
}

impl MemDisk {
    fn new(sectors: u64, can_discard: bool) -> Self {
        MemDisk {
            data: Arc::new(Mutex::new(pattern((sectors * SECTOR_SIZE) as usize, 99))),
            can_discard,
            flushes: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    fn span(&self, what: &str, offset: u64, len: u64) -> std::ops::Range<usize> {
        let disk = self.data.lock().unwrap().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= disk => offset as usize..end as usize,
            _ => panic!(
                "device asked the backend to {what} {offset:#x}+{len:#x} of a {disk:#x}-byte disk"
            ),
        }
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let r = self.span("read", offset, buf.len() as u64);
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        let r = self.span("write", offset, buf.len() as u64);
        self.data.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BackendError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        if !self.can_discard {
            return Err(BackendError::Unsupported);
        }
        let r = self.span("discard", offset, len);
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn can_discard(&self) -> bool {
        self.can_discard
    }
}

#[derive(Debug, Clone)]
enum Features {
    /// Everything the device offers (as Linux does, more or less).
    Offered,
    /// `VERSION_1` only.
    Minimal,
    Raw(u32, u32),
}

#[derive(Debug, Clone)]
enum MmioOp {
    Read {
        off: u64,
        width: u8,
    },
    Write {
        off: u64,
        width: u8,
        val: u64,
    },
    Notify(u32),
    /// The Linux bring-up sequence (reset first), with possibly bad values.
    BringUp {
        size: Option<u16>,
        rings: Option<(u64, u64, u64)>,
        features: Features,
        ready: u32,
    },
    /// The driver posts a chain on queue 0 (with the ring layout of a default bring-up),
    /// and maybe kicks the queue (a 4-byte `QueueNotify` write).
    Post(Vec<(u64, u32, bool)>, bool),
    Scribble {
        off: u32,
        bytes: Vec<u8>,
    },
}

#[derive(Debug, Clone)]
struct MmioCase {
    dq_log2: u8,
    read_only: bool,
    sectors: u64,
    can_discard: bool,
    ops: Vec<MmioOp>,
}

const REGS: [u64; 27] = [
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
    reg::CONFIG + 8,
];

fn mmio_op() -> BoxedStrategy<MmioOp> {
    let off = || {
        prop_oneof![
            8 => prop::sample::select(REGS.to_vec()),
            2 => 0x100u64..0x140,
            1 => 0u64..0x200,
            1 => any::<u64>(),
        ]
    };
    let width = || prop_oneof![6 => Just(4u8), 1 => prop::sample::select(vec![1u8, 2, 8])];
    let val = prop_oneof![
        3 => prop::sample::select(vec![0u64, 1, 3, 0xb, 0xf, 0x4f, 0x8f, 0x80, 0x7, 0x40]),
        3 => 0u64..0x20,
        1 => prop::sample::select(vec![0x1000u64, 0x2000, 0x4000, 1 << 29, 1 << 32]),
        1 => any::<u64>(),
    ];
    let features = prop_oneof![
        4 => Just(Features::Offered),
        2 => Just(Features::Minimal),
        1 => (any::<u32>(), any::<u32>()).prop_map(|(lo, hi)| Features::Raw(lo, hi)),
    ];
    let ring = || prop_oneof![3 => (0u64..M_RAM / 16).prop_map(|k| k * 16), 1 => any::<u64>()];
    let bring_up = (
        prop_oneof![4 => Just(None), 1 => any::<u16>().prop_map(Some)],
        prop_oneof![6 => Just(None), 1 => (ring(), ring(), ring()).prop_map(Some)],
        features,
        prop_oneof![8 => Just(1u32), 1 => any::<u32>()],
    )
        .prop_map(|(size, rings, features, ready)| MmioOp::BringUp {
            size,
            rings,
            features,
            ready,
        });
    prop_oneof![
        3 => (off(), width()).prop_map(|(off, width)| MmioOp::Read { off, width }),
        6 => (off(), width(), val).prop_map(|(off, width, val)| MmioOp::Write { off, width, val }),
        3 => prop_oneof![4 => 0u32..3, 1 => any::<u32>()].prop_map(MmioOp::Notify),
        2 => bring_up,
        5 => (chain_bufs(M_RAM, M_DATA, 6), prop::bool::weighted(0.7)).prop_map(|(b, kick)| MmioOp::Post(b, kick)),
        1 => (0u32..M_DATA as u32, vec(any::<u8>(), 1..16)).prop_map(|(off, bytes)| MmioOp::Scribble { off, bytes }),
    ]
    .boxed()
}

fn mmio_case() -> impl Strategy<Value = MmioCase> {
    (
        0u8..=6,
        prop::bool::weighted(0.3),
        prop_oneof![1 => 0u64..=2, 3 => 1u64..=256],
        any::<bool>(),
        vec(mmio_op(), 1..48),
    )
        .prop_map(|(dq_log2, read_only, sectors, can_discard, ops)| MmioCase {
            dq_log2,
            read_only,
            sectors,
            can_discard,
            ops,
        })
}

fn after_needs_reset<D: VirtioDevice>(t: &MmioTransport<D, Shared>, before: u32) -> bool {
    t.status() & status::NEEDS_RESET != 0 && before & status::NEEDS_RESET == 0
}

fn rd32<D: VirtioDevice>(t: &MmioTransport<D, Shared>, off: u64) -> u32 {
    let mut b = [0; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr32<D: VirtioDevice>(t: &mut MmioTransport<D, Shared>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// The queue registers of every queue: `[num, ready, desc lo, hi, driver lo, hi, device lo, hi]`.
/// Selects each queue in turn, then puts `QueueSel` back to `sel`.
fn queue_regs<D: VirtioDevice>(
    t: &mut MmioTransport<D, Shared>,
    nq: usize,
    sel: u32,
) -> Vec<[u32; 8]> {
    let regs = [
        reg::QUEUE_NUM,
        reg::QUEUE_READY,
        reg::QUEUE_DESC_LOW,
        reg::QUEUE_DESC_HIGH,
        reg::QUEUE_DRIVER_LOW,
        reg::QUEUE_DRIVER_HIGH,
        reg::QUEUE_DEVICE_LOW,
        reg::QUEUE_DEVICE_HIGH,
    ];
    let out = (0..nq)
        .map(|i| {
            wr32(t, reg::QUEUE_SEL, i as u32);
            regs.map(|r| rd32(t, r))
        })
        .collect();
    wr32(t, reg::QUEUE_SEL, sel);
    out
}

fn policy_from_regs(regs: &[[u32; 8]]) -> Policy {
    let addr = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
    let queues: Vec<_> = regs
        .iter()
        .filter(|r| r[1] == 1)
        .map(|r| {
            (
                addr(r[2], r[3]),
                addr(r[4], r[5]),
                addr(r[6], r[7]),
                r[0] as u16,
            )
        })
        .collect();
    Policy::for_queues(&queues)
}

/// Run `ops` against a transport around `device`; `check` looks at the device afterwards.
fn mmio_property<D: VirtioDevice>(
    device: D,
    c: &MmioCase,
    check: impl Fn(&D) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let mem = Rc::new(Recorder::new(0, M_RAM));
    mem.poke(M_DATA, &ram_fill()[..(M_RAM - M_DATA) as usize]);
    let irqs = Arc::new(AtomicUsize::new(0));
    let mut t = MmioTransport::new(
        device,
        Shared(mem.clone()),
        Box::new(CountIrq(irqs.clone())),
    );
    let isr = t.interrupt_status();
    let device_type = t.device().device_type();
    let maxes: Vec<u16> = t.device().queue_max_sizes().to_vec();
    let nq = maxes.len();
    let dq_size = 1u16 << c.dq_log2;
    let mut dq = DriverQueue::new(dq_size, 0);
    let mut sel = 0u32; // what the driver last wrote to QueueSel
    let ring_layout = |q: u64| (q * 0x4000, q * 0x4000 + 0x1000, q * 0x4000 + 0x2000);

    for (step, op) in c.ops.iter().enumerate() {
        let before = t.status();
        let active = t.is_active();
        let regs_before = (before & status::DRIVER_OK != 0).then(|| queue_regs(&mut t, nq, sel));
        let generation = rd32(&t, reg::CONFIG_GENERATION);
        let irqs_before = irqs.load(Ordering::SeqCst);
        mem.take_log();
        mem.set_policy(
            regs_before
                .as_deref()
                .filter(|_| active)
                .map(policy_from_regs),
        );

        let mut reset = false;
        let mut bring_up = false;
        let mut driver_set_needs_reset = false;
        match op {
            MmioOp::Read { off, width } => {
                let mut b = vec![0xa5u8; usize::from(*width)];
                t.read(*off, &mut b);
                if *off < reg::CONFIG {
                    if *width != 4 {
                        prop_assert!(
                            b.iter().all(|&x| x == 0),
                            "{}-byte register read at {:#x} gave {:x?}",
                            width,
                            off,
                            b
                        );
                    } else {
                        let v = u32::from_le_bytes(b[..4].try_into().unwrap());
                        let want = match *off {
                            reg::MAGIC => Some(0x7472_6976),
                            reg::VERSION => Some(2),
                            reg::DEVICE_ID => Some(device_type),
                            reg::STATUS => Some(t.status()),
                            reg::INTERRUPT_STATUS => Some(isr.load(Ordering::SeqCst)),
                            o if !REGS.contains(&o) => Some(0),
                            _ => None,
                        };
                        if let Some(want) = want {
                            prop_assert_eq!(v, want, "register {:#x}", off);
                        }
                    }
                }
            }
            MmioOp::Write { off, width, val } => {
                let data = val.to_le_bytes();
                t.write(*off, &data[..usize::from(*width)]);
                if *width == 4 {
                    let v = *val as u32;
                    match *off {
                        reg::QUEUE_SEL => sel = v,
                        reg::STATUS if v == 0 => {
                            reset = true;
                            sel = 0;
                        }
                        reg::STATUS => driver_set_needs_reset = v & status::NEEDS_RESET != 0,
                        _ => {}
                    }
                }
            }
            MmioOp::Notify(q) => {
                if active {
                    hit(if device_type == 4 {
                        "mmio_rng.notify_active"
                    } else {
                        "mmio_block.notify_active"
                    });
                }
                t.notify(*q as usize)
            }
            MmioOp::BringUp {
                size,
                rings,
                features,
                ready,
            } => {
                bring_up = true;
                use status::*;
                wr32(&mut t, reg::STATUS, 0);
                wr32(&mut t, reg::STATUS, ACKNOWLEDGE);
                wr32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
                let (lo, hi) = match features {
                    Features::Offered => {
                        wr32(&mut t, reg::DEVICE_FEATURES_SEL, 0);
                        let lo = rd32(&t, reg::DEVICE_FEATURES);
                        wr32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
                        (lo, rd32(&t, reg::DEVICE_FEATURES))
                    }
                    Features::Minimal => (0, 1),
                    Features::Raw(lo, hi) => (*lo, *hi),
                };
                wr32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
                wr32(&mut t, reg::DRIVER_FEATURES, hi);
                wr32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
                wr32(&mut t, reg::DRIVER_FEATURES, lo);
                wr32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
                for q in 0..nq {
                    let (d, a, u) = rings.unwrap_or(ring_layout(q as u64));
                    wr32(&mut t, reg::QUEUE_SEL, q as u32);
                    wr32(&mut t, reg::QUEUE_NUM, u32::from(size.unwrap_or(dq_size)));
                    wr32(&mut t, reg::QUEUE_DESC_LOW, d as u32);
                    wr32(&mut t, reg::QUEUE_DESC_HIGH, (d >> 32) as u32);
                    wr32(&mut t, reg::QUEUE_DRIVER_LOW, a as u32);
                    wr32(&mut t, reg::QUEUE_DRIVER_HIGH, (a >> 32) as u32);
                    wr32(&mut t, reg::QUEUE_DEVICE_LOW, u as u32);
                    wr32(&mut t, reg::QUEUE_DEVICE_HIGH, (u >> 32) as u32);
                    wr32(&mut t, reg::QUEUE_READY, *ready);
                }
                sel = nq as u32 - 1;
                wr32(
                    &mut t,
                    reg::STATUS,
                    ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
                );
                // A fresh driver-side queue 0 over zeroed rings.
                mem.poke(0, &vec![0; 0x3000]);
                dq = DriverQueue::new(dq_size, 0);
            }
            MmioOp::Post(bufs, kick) => {
                let n = bufs.len().min(usize::from(dq_size));
                dq.add(&mem.inner, &bufs[..n]);
                if *kick {
                    wr32(&mut t, reg::QUEUE_NOTIFY, 0);
                }
            }
            MmioOp::Scribble { off, bytes } => mem.poke(u64::from(*off), bytes),
        }

        let log = mem.take_log();
        if log.iter().any(|a| matches!(a, Access::Write(..))) {
            hit(if device_type == 4 {
                "mmio_rng.device_wrote"
            } else {
                "mmio_block.device_wrote"
            });
        }
        if after_needs_reset(&t, before) {
            hit(if device_type == 4 {
                "mmio_rng.needs_reset"
            } else {
                "mmio_block.needs_reset"
            });
        }
        if bring_up && t.is_active() {
            hit(if device_type == 4 {
                "mmio_rng.bring_up_ok"
            } else {
                "mmio_block.bring_up_ok"
            });
        }
        if !active {
            prop_assert!(
                log.is_empty(),
                "step {}: guest memory touched while the device is not active ({:?})",
                step,
                log.first()
            );
        }
        mem.check_policy(&format!("step {step} ({op:?})"))?;

        let after = t.status();
        prop_assert_eq!(rd32(&t, reg::STATUS), after);
        prop_assert!(
            after & status::DRIVER_OK == 0 || after & status::FEATURES_OK != 0,
            "DRIVER_OK without FEATURES_OK: {:#x}",
            after
        );
        if reset {
            prop_assert_eq!(after, 0);
            prop_assert_eq!(isr.load(Ordering::SeqCst), 0);
            for (r, &max) in queue_regs(&mut t, nq, sel).iter().zip(&maxes) {
                prop_assert_eq!(
                    r,
                    &[u32::from(max), 0, 0, 0, 0, 0, 0, 0],
                    "queue registers after reset"
                );
            }
        } else if !bring_up {
            prop_assert_eq!(
                after & before,
                before,
                "status lost bits: {:#x} -> {:#x} on {:?}",
                before,
                after,
                op
            );
            if let Some(regs) = regs_before {
                prop_assert_eq!(
                    queue_regs(&mut t, nq, sel),
                    regs,
                    "queue registers changed after DRIVER_OK"
                );
            }
        }
        if after & status::NEEDS_RESET != 0
            && before & status::NEEDS_RESET == 0
            && !driver_set_needs_reset
        {
            prop_assert!(
                isr.load(Ordering::SeqCst) & INT_CONFIG != 0,
                "NEEDS_RESET without a config interrupt"
            );
            prop_assert_ne!(rd32(&t, reg::CONFIG_GENERATION), generation);
        }
        if irqs.load(Ordering::SeqCst) != irqs_before {
            prop_assert!(
                isr.load(Ordering::SeqCst) != 0,
                "an interrupt with InterruptStatus 0"
            );
        }
        check(t.device())?;
    }
    Ok(())
}

#[test]
fn mmio_rng() {
    run_property("mmio_rng", 800, mmio_case(), |c| {
        mmio_property(Rng::new(Counter(0)), &c, |_| Ok(()))
    });
}

#[test]
fn mmio_block() {
    run_property("mmio_block", 800, mmio_case(), |c| {
        let disk = MemDisk::new(c.sectors, c.can_discard);
        let before = disk.snapshot();
        let view = disk.clone();
        mmio_property(Block::new(disk, c.read_only, b"mmio"), &c, |_| {
            if c.read_only {
                prop_assert!(view.snapshot() == before, "a read-only disk changed");
            }
            Ok(())
        })
    });
}

// =======================================================================================
// 3. virtio-blk requests
// =======================================================================================

const B_RAM: u64 = 0x4_0000;
const B_DATA: u64 = 0x4000;
const B_QSIZE: u16 = 16;
const BOUNCE: u64 = 64 * 1024;
const ID: &[u8; 20] = b"hostile-disk-serial!";

mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
}

/// A discard segment `(sector, count, flags)`.
type DiscardSeg = (u64, u32, u32);

#[derive(Debug, Clone)]
struct BlkReq {
    kind: u32,
    ioprio: u32,
    sector: u64,
    hdr_addr: u64,
    hdr_len: u32,
    /// Split the header after `k` bytes, the rest at this address.
    hdr_split: Option<(u32, u64)>,
    /// Discard segments in a readable buffer at an address after the header.
    discard: Option<(u64, Vec<DiscardSeg>)>,
    data: Vec<(u64, u32, bool)>,
    /// `(addr, len, writable)`: normally a 1-byte writable status buffer.
    status: Option<(u64, u32, bool)>,
    sorted: bool,
}

#[derive(Debug, Clone)]
struct BlkCase {
    sectors: u64,
    read_only: bool,
    can_discard: bool,
    event_idx: bool,
    reqs: Vec<BlkReq>,
}

fn sector() -> BoxedStrategy<u64> {
    prop_oneof![
        8 => 0u64..=210,
        1 => u64::MAX - 300..=u64::MAX,
        1 => (u64::MAX / SECTOR_SIZE - 4)..=(u64::MAX / SECTOR_SIZE + 4),
        1 => any::<u64>(),
    ]
    .boxed()
}

fn blk_req() -> BoxedStrategy<BlkReq> {
    let addr = || buf_addr(B_RAM, B_DATA, false);
    let kind = prop_oneof![
        8 => prop::sample::select(vec![req::IN, req::IN, req::OUT, req::OUT, req::OUT, req::FLUSH, req::GET_ID, req::DISCARD, req::DISCARD]),
        1 => any::<u32>(),
    ];
    let data_len = prop_oneof![
        4 => (0u32..=16).prop_map(|k| k * 512),
        2 => (0u32..=144).prop_map(|k| k * 512),
        2 => 0u32..2048,
        1 => any::<u32>(),
        1 => u32::MAX - 16..=u32::MAX,
    ];
    let seg = (
        sector(),
        prop_oneof![0u32..=300, any::<u32>()],
        prop_oneof![8 => Just(0u32), 1 => any::<u32>()],
    );
    let status = prop_oneof![
        16 => (B_DATA..B_RAM).prop_map(|a| Some((a, 1, true))),
        4 => addr().prop_map(|a| Some((a, 1, true))),
        1 => (addr(), buf_len(), any::<bool>()).prop_map(Some),
        1 => Just(None),
    ];
    (
        (kind, any::<u32>(), sector()),
        (
            addr(),
            prop_oneof![8 => Just(16u32), 1 => 0u32..40],
            prop_oneof![4 => Just(None), 1 => (0u32..=16, addr()).prop_map(Some)],
        ),
        prop_oneof![1 => Just(None), 1 => (addr(), vec(seg, 0..=18)).prop_map(Some)],
        vec((addr(), data_len, any::<bool>()), 0..=4),
        status,
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.4),
    )
        .prop_map(
            |(
                (kind, ioprio, mut sector),
                (mut hdr_addr, mut hdr_len, mut hdr_split),
                mut discard,
                mut data,
                mut status,
                sorted,
                natural,
                clean,
            )| {
                if clean {
                    // Well-formed but for the type, the sector and the sizes: everything in
                    // RAM, whole sectors (sometimes more than the 64 KiB bounce buffer).
                    let room = |len: u64| B_RAM - B_DATA - len;
                    hdr_addr = B_DATA + hdr_addr % room(16);
                    hdr_len = 16;
                    hdr_split = None;
                    sector %= 210;
                    for d in &mut data {
                        let sectors = if d.1 % 8 == 0 { d.1 % 145 } else { d.1 % 9 };
                        d.1 = sectors * SECTOR_SIZE as u32;
                        d.0 = B_DATA + d.0 % room(u64::from(d.1));
                    }
                    if kind == req::DISCARD {
                        data.clear();
                    }
                    if let Some((a, segs)) = &mut discard {
                        segs.truncate(1 + (*a % 4) as usize);
                        *a = B_DATA + *a % room(16 * segs.len() as u64);
                        for seg in segs {
                            seg.0 %= 210;
                            seg.1 %= 64;
                        }
                    }
                    status = Some((B_DATA + status.map_or(0, |s| s.0) % room(1), 1, true));
                }
                if natural {
                    // Data buffers in the direction the request type implies.
                    for d in &mut data {
                        d.2 = kind == req::IN || kind == req::GET_ID;
                    }
                }
                BlkReq {
                    kind,
                    ioprio,
                    sector,
                    hdr_addr,
                    hdr_len,
                    hdr_split,
                    discard,
                    data,
                    status,
                    sorted,
                }
            },
        )
        .boxed()
}

fn blk_case() -> impl Strategy<Value = BlkCase> {
    (
        prop_oneof![1 => 0u64..=4, 3 => 100u64..=200],
        prop::bool::weighted(0.25),
        prop::bool::weighted(0.7),
        any::<bool>(),
        vec(blk_req(), 1..8),
    )
        .prop_map(
            |(sectors, read_only, can_discard, event_idx, reqs)| BlkCase {
                sectors,
                read_only,
                can_discard,
                event_idx,
                reqs,
            },
        )
}

/// Write the request's header (and discard segments) into guest RAM; return its chain.
fn place_request(mem: &Recorder, r: &BlkReq) -> Vec<(u64, u32, bool)> {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&r.kind.to_le_bytes());
    hdr[4..8].copy_from_slice(&r.ioprio.to_le_bytes());
    hdr[8..16].copy_from_slice(&r.sector.to_le_bytes());
    let mut bufs = Vec::new();
    match r.hdr_split {
        None => {
            mem.poke(r.hdr_addr, &hdr);
            bufs.push((r.hdr_addr, r.hdr_len, false));
        }
        Some((k, rest)) => {
            let k = k.min(16);
            mem.poke(r.hdr_addr, &hdr[..k as usize]);
            mem.poke(rest, &hdr[k as usize..]);
            bufs.push((r.hdr_addr, k, false));
            bufs.push((rest, r.hdr_len.saturating_sub(k), false));
        }
    }
    if let Some((addr, segs)) = &r.discard {
        let mut raw = Vec::new();
        for &(sector, count, flags) in segs {
            raw.extend(sector.to_le_bytes());
            raw.extend(count.to_le_bytes());
            raw.extend(flags.to_le_bytes());
        }
        mem.poke(*addr, &raw);
        bufs.push((*addr, raw.len() as u32, false));
    }
    bufs.extend(&r.data);
    bufs.extend(r.status);
    if r.sorted {
        bufs.sort_by_key(|b| b.2);
    }
    bufs
}

/// What the device should do with one request (virtio 1.x §5.2.6 plus the documented
/// checks): the status it writes (if its status byte is in RAM), the used length, the
/// disk afterwards, and the bytes it puts in the data buffers.
#[derive(Debug)]
struct BlkExpect {
    /// The request was looked at (its chain ends in a writable byte).
    executed: bool,
    status: Option<(u64, u8)>,
    used: u32,
    disk: Vec<u8>,
    data: Vec<u8>,
    flush: bool,
}

fn model_blk(
    mem: &Recorder,
    descs: &[Descriptor],
    disk: &[u8],
    read_only: bool,
    discard: bool,
) -> BlkExpect {
    const OK: u8 = blk::status::OK;
    const IOERR: u8 = blk::status::IOERR;
    const UNSUPP: u8 = blk::status::UNSUPP;
    let mut disk = disk.to_vec();
    let mut flush = false;
    let untouched = |disk: Vec<u8>| BlkExpect {
        executed: false,
        status: None,
        used: 0,
        disk,
        data: vec![],
        flush: false,
    };
    // The status byte is the last byte of the last descriptor, which must be writable.
    let Some(last) = descs.last().filter(|d| d.writable && d.len > 0) else {
        return untouched(disk);
    };
    let Some(status_addr) = last.addr.checked_add(u64::from(last.len) - 1) else {
        return untouched(disk);
    };
    // A status byte outside RAM: the request is not executed at all.
    if !mem.check_range(status_addr, 1) {
        return untouched(disk);
    }
    // Any buffer outside RAM: IOERR before any I/O.
    let all_in_ram = descs
        .iter()
        .all(|d| mem.check_range(d.addr, u64::from(d.len)));
    let (rd, wr) = split_chain(descs);
    let r_total = total_len(&rd);
    let data_in = total_len(&wr) - 1;
    let cap = disk.len() as u64 / SECTOR_SIZE;
    let range = |sector: u64, len: u64| -> Option<usize> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= cap).then(|| (sector * SECTOR_SIZE) as usize)
    };
    let (st, written, data): (u8, u64, Vec<u8>) = 'req: {
        if !all_in_ram {
            break 'req (IOERR, 0, vec![]);
        }
        let Some(hdr) = stream_read(mem, &rd, 0, 16) else {
            break 'req (IOERR, 0, vec![]);
        };
        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        match kind {
            req::IN => {
                let Some(off) = range(sector, data_in) else {
                    break 'req (IOERR, 0, vec![]);
                };
                let mut done = 0;
                while done < data_in {
                    let n = (data_in - done).min(BOUNCE);
                    if !stream_in_ram(mem, &wr, done, n) {
                        break 'req (IOERR, done, vec![]);
                    }
                    done += n;
                }
                (OK, done, disk[off..off + done as usize].to_vec())
            }
            req::OUT => {
                let len = r_total - 16;
                let Some(off) = range(sector, len) else {
                    break 'req (IOERR, 0, vec![]);
                };
                if read_only {
                    break 'req (IOERR, 0, vec![]);
                }
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(BOUNCE);
                    let Some(bytes) = stream_read(mem, &rd, 16 + done, n) else {
                        break 'req (IOERR, 0, vec![]);
                    };
                    let at = off + done as usize;
                    disk[at..at + n as usize].copy_from_slice(&bytes);
                    done += n;
                }
                (OK, 0, vec![])
            }
            req::FLUSH => {
                flush = true;
                (OK, 0, vec![])
            }
            req::GET_ID => {
                let n = data_in.min(20);
                if stream_in_ram(mem, &wr, 0, n) {
                    (OK, n, ID[..n as usize].to_vec())
                } else {
                    (IOERR, 0, vec![])
                }
            }
            req::DISCARD if discard => {
                let rest = r_total - 16;
                let segs = rest / 16;
                if segs == 0 || !rest.is_multiple_of(16) || segs > 16 {
                    break 'req (IOERR, 0, vec![]);
                }
                // All segments are checked before any is discarded.
                let mut ranges = vec![];
                for i in 0..segs {
                    let Some(seg) = stream_read(mem, &rd, 16 + 16 * i, 16) else {
                        break 'req (IOERR, 0, vec![]);
                    };
                    let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                    let count = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap()));
                    if u32::from_le_bytes(seg[12..16].try_into().unwrap()) != 0 {
                        break 'req (UNSUPP, 0, vec![]);
                    }
                    let Some(off) = range(sector, count * SECTOR_SIZE) else {
                        break 'req (IOERR, 0, vec![]);
                    };
                    ranges.push(off..off + (count * SECTOR_SIZE) as usize);
                }
                for r in ranges {
                    disk[r].fill(0);
                }
                (OK, 0, vec![])
            }
            _ => (UNSUPP, 0, vec![]),
        }
    };
    let reachable = mem.check_range(status_addr, 1);
    BlkExpect {
        executed: true,
        status: reachable.then_some((status_addr, st)),
        used: if reachable {
            u32::try_from(written + 1).unwrap_or(u32::MAX)
        } else {
            0
        },
        disk,
        data,
        flush,
    }
}

struct BlkRig {
    mem: Recorder,
    dq: DriverQueue,
    queues: [Queue; 1],
    event_idx: bool,
}

impl BlkRig {
    fn new(event_idx: bool) -> Self {
        let mem = Recorder::new(0, B_RAM);
        mem.poke(B_DATA, &ram_fill()[..(B_RAM - B_DATA) as usize]);
        let mut rig = BlkRig {
            mem,
            dq: DriverQueue::new(B_QSIZE, 0),
            queues: [Queue::new(256)],
            event_idx,
        };
        rig.fresh_queue();
        rig
    }

    /// A new queue after the old one broke (a transport would reset the device).
    fn fresh_queue(&mut self) {
        self.mem.poke(0, &vec![0; B_DATA as usize]);
        self.dq = DriverQueue::new(B_QSIZE, 0);
        self.queues = [Queue::new(256)];
        self.dq.configure(&mut self.queues[0]);
        self.queues[0].set_event_idx(self.event_idx);
        self.queues[0].validate(&self.mem).unwrap();
        self.mem.set_policy(Some(Policy::for_queues(&[(
            self.dq.desc,
            self.dq.avail,
            self.dq.used,
            B_QSIZE,
        )])));
    }

    fn used_ring(&self) -> (u64, u64) {
        (self.dq.used, 6 + 8 * u64::from(B_QSIZE))
    }
}

/// One request through the device; `strict` also demands that the disk only changes
/// for requests that complete with status OK.
fn blk_request(
    rig: &mut BlkRig,
    dev: &mut Block<MemDisk>,
    disk: &MemDisk,
    c: &BlkCase,
    r: &BlkReq,
    strict: bool,
) -> Result<(), TestCaseError> {
    let bufs = place_request(&rig.mem, r);
    let descs = as_descs(&bufs);
    let before = disk.snapshot();
    let flushes = disk.flushes.load(Ordering::SeqCst);
    let discard = c.can_discard && !c.read_only;
    let want = model_blk(&rig.mem, &descs, &before, c.read_only, discard);
    rig.mem.take_log();
    let head = rig.dq.add(&rig.mem.inner, &bufs);
    let result = dev.queue_notify(0, &mut rig.queues, &rig.mem);
    let log = rig.mem.take_log();
    rig.mem.check_policy(&format!("request {r:?}"))?;
    let after = disk.snapshot();

    if !ordered(&bufs) {
        // A readable buffer after a writable one: the ring is refused, nothing is done.
        prop_assert!(result.is_err(), "a misordered chain was accepted");
        prop_assert!(writes_of(&log).is_empty(), "a refused chain was written to");
        prop_assert!(after == before, "a refused chain changed the disk");
        rig.fresh_queue();
        return Ok(());
    }
    prop_assert!(result.is_ok(), "queue_notify: {:?}", result);
    let used = rig.dq.used(&rig.mem.inner);
    prop_assert_eq!(used.len(), 1);
    prop_assert_eq!(used[0].0, u32::from(head));
    let used_len = used[0].1;
    hit(match want.status.map(|s| s.1) {
        None if want.executed => "blk_requests.status_unreachable",
        None => "blk_requests.no_status",
        Some(blk::status::OK) => match r.kind {
            req::IN => "blk_requests.ok_in",
            req::OUT => "blk_requests.ok_out",
            req::DISCARD => "blk_requests.ok_discard",
            _ => "blk_requests.ok_other",
        },
        Some(blk::status::IOERR) => "blk_requests.ioerr",
        Some(_) => "blk_requests.unsupp",
    });
    if r.kind == req::OUT
        && want.status.is_some_and(|s| s.1 == blk::status::OK)
        && !after.is_empty()
        && want.data.is_empty()
    {
        let (rd, _) = split_chain(&descs);
        if total_len(&rd) - 16 > BOUNCE {
            hit("blk_requests.ok_out_multichunk");
        }
    }
    let writable: u64 = descs
        .iter()
        .filter(|d| d.writable)
        .map(|d| u64::from(d.len))
        .sum();
    prop_assert!(
        u64::from(used_len) <= writable,
        "used length {} > writable bytes {}",
        used_len,
        writable
    );
    prop_assert_eq!(
        used_len,
        want.used,
        "used length (expected {:?})",
        want.status
    );

    // The device's own writes, outside the used ring: data, then the status byte last.
    let ring = [rig.used_ring()];
    let mut dev_writes: Vec<(u64, Vec<u8>)> = writes_of(&log)
        .into_iter()
        .filter(|(a, d)| !within(&ring, *a, d.len() as u64))
        .collect();
    match want.status {
        None if !want.executed => prop_assert!(
            dev_writes.is_empty(),
            "wrote {} buffers of a chain without a status byte",
            dev_writes.len()
        ),
        // Executed, but the status byte is outside RAM: data may have been written.
        None => {}
        Some((addr, st)) => {
            let last = dev_writes.pop();
            prop_assert_eq!(last, Some((addr, vec![st])), "status byte");
            if st == blk::status::OK {
                let data: Vec<u8> = dev_writes.into_iter().flat_map(|(_, d)| d).collect();
                same_bytes("data read from the disk", &data, &want.data)?;
            }
        }
    }
    prop_assert_eq!(
        disk.flushes.load(Ordering::SeqCst) - flushes,
        usize::from(want.flush)
    );
    if after != want.disk {
        let i = (0..after.len())
            .find(|&i| after[i] != want.disk[i])
            .unwrap();
        return Err(fail(format!(
            "disk byte {i:#x} is {:#x}, expected {:#x}",
            after[i], want.disk[i]
        )));
    }

    // The brief's invariants, independent of the model.
    if c.read_only {
        prop_assert!(after == before, "a read-only disk changed");
    }
    if after != before {
        let first = (0..after.len()).find(|&i| after[i] != before[i]).unwrap() as u64;
        let last = (0..after.len()).rfind(|&i| after[i] != before[i]).unwrap() as u64;
        prop_assert!(
            r.kind == req::OUT || r.kind == req::DISCARD,
            "a type {} request changed the disk",
            r.kind
        );
        if r.kind == req::OUT {
            let (rd, _) = split_chain(&descs);
            let start = r.sector.saturating_mul(SECTOR_SIZE);
            let end = start.saturating_add(total_len(&rd) - 16);
            prop_assert!(
                end <= after.len() as u64 && start <= first && last < end,
                "an OUT changed bytes outside its range"
            );
        }
        if want.status.map(|s| s.1) != Some(blk::status::OK) {
            hit("blk_requests.changed_without_ok");
        }
        if strict {
            prop_assert_eq!(
                want.status.map(|s| s.1),
                Some(blk::status::OK),
                "the disk changed but the request did not complete OK"
            );
        }
    }
    Ok(())
}

fn blk_property(c: BlkCase, strict: bool) -> Result<(), TestCaseError> {
    let disk = MemDisk::new(c.sectors, c.can_discard);
    let mut dev = Block::new(disk.clone(), c.read_only, ID);
    let mut rig = BlkRig::new(c.event_idx);
    for r in &c.reqs {
        blk_request(&mut rig, &mut dev, &disk, &c, r, strict)?;
    }
    Ok(())
}

#[test]
fn blk_requests() {
    run_property("blk_requests", 2500, blk_case(), |c| blk_property(c, false));
}

/// The strict form of "the disk only changes for OUT/DISCARD requests that complete OK".
/// It also counts coverage under `blk_requests.*`.
#[test]
fn blk_disk_changes_only_when_ok() {
    run_property("blk_disk_changes_only_when_ok", 1000, blk_case(), |c| {
        blk_property(c, true)
    });
}

// ---------------------------------------------------------------------------------------
// virtio-blk regressions (minimal inputs found by the properties above)
// ---------------------------------------------------------------------------------------

/// One chain through a fresh virtio-blk device over a `sectors`-sector disk (pattern
/// bytes; guest RAM filled with other pattern bytes). `setup` writes the request.
/// Returns (status byte if its address is in RAM, used length, disk before, disk after).
fn blk_submit(
    sectors: u64,
    bufs: &[(u64, u32, bool)],
    setup: impl FnOnce(&Recorder),
) -> (Option<u8>, u32, Vec<u8>, Vec<u8>) {
    let disk = MemDisk::new(sectors, true);
    let before = disk.snapshot();
    let mut dev = Block::new(disk.clone(), false, ID);
    let mut rig = BlkRig::new(false);
    setup(&rig.mem);
    rig.dq.add(&rig.mem.inner, bufs);
    dev.queue_notify(0, &mut rig.queues, &rig.mem).unwrap();
    rig.mem.check_policy("regression").unwrap();
    let used = rig.dq.used(&rig.mem.inner);
    assert_eq!(used.len(), 1);
    let &(addr, len, _) = bufs.last().unwrap();
    let status = rig.mem.peek(addr + u64::from(len) - 1, 1).map(|b| b[0]);
    (status, used[0].1, before, disk.snapshot())
}

fn blk_header(mem: &Recorder, addr: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.poke(addr, &h);
}

/// Found by `blk_disk_changes_only_when_ok` (shrunk): a DISCARD whose second segment has
/// `flags = 1` completes with `UNSUPP`, but its first segment (sector 0, 1 sector) was
/// already discarded. `devices/src/virtio/blk.rs`, `Block::discard` (lines 198-224 at the time of writing)
/// calls `backend.discard` per segment before checking the next one.
#[test]
fn blk_discard_with_a_bad_second_segment_changes_nothing() {
    const HDR: u64 = 0x4000;
    const SEGS: u64 = 0x5000;
    const STATUS: u64 = 0x6000;
    let (status, _, before, after) = blk_submit(
        8,
        &[(HDR, 16, false), (SEGS, 32, false), (STATUS, 1, true)],
        |mem| {
            blk_header(mem, HDR, req::DISCARD, 0);
            let mut segs = [0u8; 32];
            segs[8..12].copy_from_slice(&1u32.to_le_bytes()); // sector 0, 1 sector, flags 0
            segs[28..32].copy_from_slice(&1u32.to_le_bytes()); // sector 0, 0 sectors, flags 1 (UNMAP)
            mem.poke(SEGS, &segs);
        },
    );
    assert_eq!(status, Some(blk::status::UNSUPP));
    assert!(after == before, "an UNSUPP discard zeroed sector 0");
}

/// An OUT of 64 KiB + 512 bytes whose last 512 bytes lie outside guest RAM completes with
/// `IOERR`, but the first 64 KiB were written to the disk. `devices/src/virtio/blk.rs`,
/// `Block::write` (lines 179-196 at the time of writing) writes each 64 KiB bounce chunk before reading the next.
#[test]
fn blk_out_with_an_unreadable_tail_changes_nothing() {
    const HDR: u64 = 0x4000;
    const STATUS: u64 = 0x6000;
    let bufs = [
        (HDR, 16, false),
        (0x1_0000, 0x1_0000, false),
        (1 << 40, 512, false),
        (STATUS, 1, true),
    ];
    let (status, _, before, after) =
        blk_submit(256, &bufs, |mem| blk_header(mem, HDR, req::OUT, 0));
    assert_eq!(status, Some(blk::status::IOERR));
    assert!(
        after == before,
        "an IOERR write changed the first 64 KiB of the disk"
    );
}

/// An OUT whose status byte lies outside guest RAM is executed (the disk changes) and
/// returned with used length 0: the guest is never told the write happened.
/// `devices/src/virtio/blk.rs`, `queue_notify` (lines 264-268 at the time of writing) runs the request before
/// finding that the status byte cannot be written.
#[test]
fn blk_out_with_an_unreachable_status_byte_changes_nothing() {
    const HDR: u64 = 0x4000;
    let bufs = [(HDR, 16, false), (0x1_0000, 512, false), (1 << 40, 1, true)];
    let (status, used, before, after) =
        blk_submit(8, &bufs, |mem| blk_header(mem, HDR, req::OUT, 0));
    assert_eq!((status, used), (None, 0));
    assert!(
        after == before,
        "a request with no status byte changed the disk"
    );
}

/// Guest RAM of `SPARSE_RAM` bytes of which only the first `SPARSE_LOW` are stored:
/// reads above read zeros, writes above are dropped.
struct SparseMem {
    low: VecMemory,
}

const SPARSE_LOW: u64 = 0x10_0000;
const SPARSE_RAM: u64 = 8 << 30;

impl GuestMemory for SparseMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        if self.low.read(addr, buf).is_ok() {
            return Ok(());
        }
        if !self.check_range(addr, buf.len() as u64) {
            return Err(MemError {
                addr,
                len: buf.len() as u64,
            });
        }
        buf.fill(0);
        Ok(())
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        if addr
            .checked_add(buf.len() as u64)
            .is_some_and(|e| e <= SPARSE_LOW)
        {
            return self.low.write(addr, buf);
        }
        if !self.check_range(addr, buf.len() as u64) {
            return Err(MemError {
                addr,
                len: buf.len() as u64,
            });
        }
        Ok(())
    }
    fn check_range(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len).is_some_and(|e| e <= SPARSE_RAM)
    }
}

/// A disk of zeros that stores nothing.
struct ZeroDisk(u64);

impl BlockBackend for ZeroDisk {
    fn size(&self) -> u64 {
        self.0
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        assert!(offset + buf.len() as u64 <= self.0);
        buf.fill(0);
        Ok(())
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), BackendError> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A 4 GiB IN (two 2 GiB writable buffers plus the status byte; virtio forbids chains of
/// 2^32 bytes or more, a hostile driver does not care) is executed, and its used length
/// comes out as 1: `written as u32 + 1` in `devices/src/virtio/blk.rs` `queue_notify`
/// (line 267 at the time of writing) truncates the 2^32 bytes written. No panic, no bad access; the guest is
/// told a wrong length. (Takes a few seconds: 4 GiB go through the bounce buffer.)
#[test]
fn blk_4gib_read_reports_a_truncated_used_length() {
    let mem = SparseMem {
        low: VecMemory::new(0, SPARSE_LOW as usize),
    };
    let mut dq = DriverQueue::new(16, 0);
    let mut queues = [Queue::new(256)];
    dq.configure(&mut queues[0]);
    queues[0].validate(&mem).unwrap();
    let mut dev = Block::new(ZeroDisk(5 << 30), false, ID);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req::IN.to_le_bytes());
    mem.write(0x4000, &h).unwrap();
    dq.add(
        &mem,
        &[
            (0x4000, 16, false),
            (1 << 30, 1 << 31, true),
            (3 << 30, 1 << 31, true),
            (0x5000, 1, true),
        ],
    );
    dev.queue_notify(0, &mut queues, &mem).unwrap();
    let mut st = [0xff];
    mem.read(0x5000, &mut st).unwrap();
    assert_eq!(st[0], blk::status::OK);
    let used = dq.used(&mem);
    // 2^32 + 1 bytes were written; the most a u32 can say is u32::MAX, not 1.
    assert!(
        used[0].1 > 1,
        "used length {} for 4 GiB + 1 bytes written",
        used[0].1
    );
}

// =======================================================================================
// 4a. virtio-net
// =======================================================================================

const N_RAM: u64 = 0x4_0000;
const N_DATA: u64 = 0x8000;
const N_QSIZE: u16 = 64;

#[derive(Default)]
struct FakeNet {
    /// Every frame the device tried to send.
    sent: Vec<Vec<u8>>,
    fail_send: bool,
    inbox: VecDeque<Vec<u8>>,
}

impl NetBackend for FakeNet {
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        assert!(
            frame.len() >= net::HDR_LEN && frame.len() <= net::MAX_FRAME,
            "sent a {}-byte frame",
            frame.len()
        );
        self.sent.push(frame.to_vec());
        if self.fail_send {
            Err(NetError::Io(5))
        } else {
            Ok(())
        }
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        let Some(f) = self.inbox.pop_front() else {
            return Ok(None);
        };
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(Some(f.len()))
    }
    fn set_offloads(&mut self, _guest_features: u64) -> Result<(), NetError> {
        Ok(())
    }
}

/// A transmit chain: a virtio-net header (flags, gso_type) at the start of a stream of
/// `len` bytes at `addr`, cut into descriptors; plus possibly extra (hostile) buffers.
#[derive(Debug, Clone)]
struct StreamChain {
    addr: u64,
    len: u32,
    cuts: Vec<u32>,
    hdr: Vec<u8>,
    extra: Vec<(u64, u32, bool)>,
    extra_first: bool,
    sorted: bool,
}

impl StreamChain {
    fn place(&self, mem: &Recorder) -> Vec<(u64, u32, bool)> {
        mem.poke(
            self.addr,
            &self.hdr[..self.hdr.len().min(self.len as usize)],
        );
        let mut cuts: Vec<u32> = self.cuts.iter().map(|&c| c % (self.len + 1)).collect();
        cuts.push(0);
        cuts.push(self.len);
        cuts.sort_unstable();
        let mut bufs: Vec<(u64, u32, bool)> = cuts
            .windows(2)
            .map(|w| (self.addr + u64::from(w[0]), w[1] - w[0], false))
            .collect();
        if self.extra_first {
            bufs.splice(0..0, self.extra.iter().copied());
        } else {
            bufs.extend(&self.extra);
        }
        if self.sorted {
            bufs.sort_by_key(|b| b.2);
        }
        bufs
    }
}

fn stream_chain(
    ram: u64,
    data: u64,
    lens: BoxedStrategy<u32>,
    hdr: BoxedStrategy<Vec<u8>>,
) -> BoxedStrategy<StreamChain> {
    (
        data..ram,
        lens,
        vec(any::<u32>(), 0..4),
        hdr,
        prop_oneof![4 => Just(vec![]), 1 => vec((buf_addr(ram, data, false), buf_len(), prop::bool::weighted(0.3)), 1..3)],
        any::<bool>(),
        prop::bool::weighted(0.95),
    )
        .prop_map(move |(addr, len, cuts, hdr, extra, extra_first, sorted)| {
            // Keep the stream itself in RAM; the extras are the hostile part.
            let len = len.min((ram - addr) as u32);
            StreamChain {
                addr,
                len,
                cuts,
                hdr,
                extra,
                extra_first,
                sorted,
            }
        })
        .boxed()
}

#[derive(Debug, Clone)]
struct NetCase {
    features: u64,
    fail_send: bool,
    tx: Vec<StreamChain>,
    rx: Vec<Vec<(u64, u32, bool)>>,
    frames: Vec<(usize, u8, u8)>,
}

fn net_hdr() -> BoxedStrategy<Vec<u8>> {
    let flags = prop_oneof![3 => Just(0u8), 2 => Just(1u8), 1 => any::<u8>()];
    let gso = prop_oneof![3 => Just(0u8), 1 => prop::sample::select(vec![1u8, 3, 4, 5, 0x80, 0x81, 0x84]), 1 => any::<u8>()];
    (flags, gso, vec(any::<u8>(), 10))
        .prop_map(|(f, g, mut rest)| {
            rest.splice(0..0, [f, g]);
            rest
        })
        .boxed()
}

fn net_case() -> impl Strategy<Value = NetCase> {
    let mf = net::MAX_FRAME as u32;
    let lens = prop_oneof![
        4 => 0u32..2000,
        1 => prop::sample::select(vec![0u32, 11, 12, 13, mf - 1, mf, mf + 1]),
        1 => 0u32..0x1_2000,
    ]
    .boxed();
    let frame_len = prop_oneof![4 => 0usize..2000, 1 => prop::sample::select(vec![0usize, 11, 12, net::MAX_FRAME, net::MAX_FRAME + 1])];
    let gso = prop_oneof![3 => Just(0u8), 1 => prop::sample::select(vec![1u8, 3, 4, 0x80, 0x81, 0x84]), 1 => any::<u8>()];
    (
        prop_oneof![1 => Just(u64::MAX), 1 => Just(0u64), 2 => any::<u64>()],
        prop::bool::weighted(0.2),
        vec(stream_chain(N_RAM, N_DATA, lens, net_hdr()), 0..12),
        vec(
            chain_bufs(N_RAM, N_DATA, 4).prop_map(|mut b| {
                b.sort_by_key(|x| x.2);
                b
            }),
            0..12,
        ),
        vec(
            (
                frame_len,
                prop_oneof![Just(0u8), Just(1u8), any::<u8>()],
                gso,
            ),
            0..12,
        ),
    )
        .prop_map(|(features, fail_send, tx, rx, frames)| NetCase {
            features,
            fail_send,
            tx,
            rx,
            frames,
        })
}

/// Whether a header only asks for offloads the features allow (virtio 1.x §5.1.6.2),
/// given the direction's `[checksum, tso4, tso6, ecn]` bits; UFO is never offered.
fn net_offloads_ok(frame: &[u8], features: u64, [csum, tso4, tso6, ecn]: [u64; 4]) -> bool {
    let has = |b: u64| features & b != 0;
    if frame[0] & 1 != 0 && !has(csum) {
        return false;
    }
    match (frame[1] & 0x7f, frame[1] & 0x80 != 0) {
        (0, ecn_bit) => !ecn_bit,
        (1, e) => has(tso4) && (!e || has(ecn)),
        (4, e) => has(tso6) && (!e || has(ecn)),
        _ => false,
    }
}

fn net_property(c: NetCase) -> Result<(), TestCaseError> {
    use net::feature::*;
    let mem = Recorder::new(0, N_RAM);
    mem.poke(N_DATA, &ram_fill()[..(N_RAM - N_DATA) as usize]);
    let mut rxq = DriverQueue::new(N_QSIZE, 0);
    let mut txq = DriverQueue::new(N_QSIZE, 0x4000);
    let mut queues = [Queue::new(256), Queue::new(256)];
    rxq.configure(&mut queues[0]);
    txq.configure(&mut queues[1]);
    for q in &mut queues {
        q.set_event_idx(c.features & (1 << 29) != 0);
        q.validate(&mem).unwrap();
    }
    mem.set_policy(Some(Policy::for_queues(&[
        (rxq.desc, rxq.avail, rxq.used, N_QSIZE),
        (txq.desc, txq.avail, txq.used, N_QSIZE),
    ])));
    // The frames to receive later (transmitting never calls `recv`).
    let inbox = c
        .frames
        .iter()
        .map(|&(len, flags, gso)| {
            let mut f = pattern(len, len as u64);
            if f.len() >= 2 {
                f[0] = flags;
                f[1] = gso;
            }
            f
        })
        .collect();
    let mut dev = Net::new(
        FakeNet {
            fail_send: c.fail_send,
            inbox,
            ..FakeNet::default()
        },
        [2, 0, 0, 0, 0, 1],
    );
    let features = c.features & dev.features();
    dev.activate(features);
    let tx_used = [(txq.used, 6 + 8 * u64::from(N_QSIZE))];

    for sc in &c.tx {
        let bufs = sc.place(&mem);
        let descs = as_descs(&bufs);
        let want = if descs.iter().any(|d| d.writable) {
            None
        } else {
            let total = total_len(&descs);
            if (net::HDR_LEN as u64..=net::MAX_FRAME as u64).contains(&total) {
                stream_read(&mem, &descs, 0, total).filter(|f| {
                    net_offloads_ok(f, features, [CSUM, HOST_TSO4, HOST_TSO6, HOST_ECN])
                })
            } else {
                None
            }
        };
        let sent_before = dev.backend().sent.len();
        mem.take_log();
        let head = txq.add(&mem.inner, &bufs);
        let r = dev.queue_notify(1, &mut queues, &mem);
        let log = mem.take_log();
        mem.check_policy("net tx")?;
        for (a, d) in writes_of(&log) {
            prop_assert!(
                within(&tx_used, a, d.len() as u64),
                "transmit wrote {:#x}+{:#x}",
                a,
                d.len()
            );
        }
        if !ordered(&bufs) {
            prop_assert!(r.is_err());
            prop_assert_eq!(dev.backend().sent.len(), sent_before);
            return Ok(());
        }
        prop_assert!(r.is_ok(), "{:?}", r);
        prop_assert_eq!(txq.used(&mem.inner), vec![(u32::from(head), 0)]);
        let sent = &dev.backend().sent[sent_before..];
        hit(if want.is_some() {
            "net_tx_rx.tx_sent"
        } else {
            "net_tx_rx.tx_dropped"
        });
        match want {
            None => prop_assert!(
                sent.is_empty(),
                "sent a frame the device should have dropped"
            ),
            Some(f) => {
                prop_assert_eq!(sent.len(), 1, "the frame was not sent");
                same_bytes("sent frame", &sent[0], &f)?;
            }
        }
    }

    // Receive: random frames into random chains.
    let mut caps = Vec::new();
    for bufs in c.rx.iter().take(usize::from(N_QSIZE) / 4) {
        caps.push(
            bufs.iter()
                .filter(|b| b.2)
                .map(|b| u64::from(b.1))
                .sum::<u64>(),
        );
        rxq.add(&mem.inner, bufs);
    }
    mem.take_log();
    let r1 = dev.backend_ready(&mut queues, &mem);
    let r2 = dev.queue_notify(0, &mut queues, &mem);
    mem.check_policy("net rx")?;
    prop_assert!(r1.is_ok() && r2.is_ok(), "{:?} {:?}", r1, r2);
    for ((_, len), cap) in rxq.used(&mem.inner).into_iter().zip(caps) {
        hit(if len > 0 {
            "net_tx_rx.rx_delivered"
        } else {
            "net_tx_rx.rx_empty"
        });
        prop_assert!(u64::from(len) <= cap, "used length {} > room {}", len, cap);
    }
    Ok(())
}

#[test]
fn net_tx_rx() {
    run_property("net_tx_rx", 1000, net_case(), net_property);
}

// =======================================================================================
// 4b. virtio-vsock
// =======================================================================================

const V_RAM: u64 = 0x4_0000;
const V_DATA: u64 = 0xc000;
const V_QSIZE: u16 = 64;
const CID: u64 = 3;

#[derive(Default)]
struct FakeVsock {
    sent: Vec<(PacketHeader, Vec<u8>)>,
    outbox: VecDeque<(PacketHeader, Vec<u8>)>,
    /// Claims to have packets it never produces.
    liar: bool,
}

impl VsockBackend for FakeVsock {
    fn send_pkt(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        // The documented contract of what reaches a backend.
        assert_eq!(hdr.src_cid, CID, "src_cid");
        assert_eq!(hdr.dst_cid, vsock::HOST_CID, "dst_cid");
        assert_eq!(hdr.type_, vsock::TYPE_STREAM, "type");
        assert_eq!(hdr.len as usize, payload.len(), "len");
        assert!(payload.len() <= vsock::MAX_PAYLOAD);
        self.sent.push((*hdr, payload.to_vec()));
    }
    fn recv_pkt(&mut self, hdr: &mut PacketHeader, payload: &mut [u8]) -> Option<usize> {
        let (h, p) = self.outbox.pop_front()?;
        *hdr = h;
        let n = p.len().min(payload.len());
        payload[..n].copy_from_slice(&p[..n]);
        // Sometimes more than fits: the device must clamp it.
        Some(p.len())
    }
    fn has_pending(&self) -> bool {
        self.liar || !self.outbox.is_empty()
    }
}

#[derive(Debug, Clone)]
struct VsockCase {
    tx: Vec<StreamChain>,
    rx: Vec<Vec<(u64, u32, bool)>>,
    outbox: Vec<(u16, usize)>,
    liar: bool,
    rx_first: bool,
}

fn vsock_hdr() -> BoxedStrategy<Vec<u8>> {
    let cid = |good: u64| prop_oneof![6 => Just(good), 1 => any::<u64>()];
    (
        cid(CID),
        cid(vsock::HOST_CID),
        any::<(u32, u32)>(),
        prop_oneof![4 => 0u32..200, 1 => prop::sample::select(vec![vsock::MAX_PAYLOAD as u32, vsock::MAX_PAYLOAD as u32 + 1]), 1 => any::<u32>()],
        prop_oneof![6 => Just(vsock::TYPE_STREAM), 1 => any::<u16>()],
        prop_oneof![6 => 0u16..8, 1 => any::<u16>()],
        any::<(u32, u32, u32)>(),
    )
        .prop_map(|(src_cid, dst_cid, (src_port, dst_port), len, type_, op, (flags, buf_alloc, fwd_cnt))| {
            PacketHeader {
                src_cid,
                dst_cid,
                src_port,
                dst_port,
                len,
                type_,
                op,
                flags,
                buf_alloc,
                fwd_cnt,
            }
            .to_bytes()
            .to_vec()
        })
        .boxed()
}

fn vsock_case() -> impl Strategy<Value = VsockCase> {
    let h = vsock::HDR_LEN as u32;
    let lens = prop_oneof![
        4 => h..h + 300,
        1 => 0u32..h,
        1 => h..h + 0x1_1000,
    ]
    .boxed();
    (
        vec(stream_chain(V_RAM, V_DATA, lens, vsock_hdr()), 0..12),
        vec(
            chain_bufs(V_RAM, V_DATA, 4).prop_map(|mut b| {
                b.sort_by_key(|x| x.2);
                b
            }),
            0..12,
        ),
        vec((0u16..8, prop_oneof![0usize..200, 0usize..0x1_1000]), 0..6),
        prop::bool::weighted(0.2),
        any::<bool>(),
    )
        .prop_map(|(tx, rx, outbox, liar, rx_first)| VsockCase {
            tx,
            rx,
            outbox,
            liar,
            rx_first,
        })
}

/// What the backend should get for one transmit chain: the packet, or the RST that
/// resets the connection, or nothing.
fn model_vsock_tx(mem: &Recorder, descs: &[Descriptor]) -> Option<(PacketHeader, Vec<u8>)> {
    let (rd, _) = split_chain(descs);
    let raw = stream_read(mem, &rd, 0, vsock::HDR_LEN as u64)?;
    let hdr = PacketHeader::from_bytes(raw[..].try_into().unwrap());
    if hdr.src_cid != CID || hdr.type_ != vsock::TYPE_STREAM || hdr.dst_cid != vsock::HOST_CID {
        return None;
    }
    let len = u64::from(hdr.len);
    let payload = (len <= vsock::MAX_PAYLOAD as u64)
        .then(|| stream_read(mem, &rd, vsock::HDR_LEN as u64, len))
        .flatten();
    match payload {
        Some(p) => Some((hdr, p)),
        None => Some((
            PacketHeader {
                op: vsock::op::RST,
                len: 0,
                flags: 0,
                ..hdr
            },
            vec![],
        )),
    }
}

fn vsock_property(c: VsockCase) -> Result<(), TestCaseError> {
    let mem = Recorder::new(0, V_RAM);
    mem.poke(V_DATA, &ram_fill()[..(V_RAM - V_DATA) as usize]);
    let mut rxq = DriverQueue::new(V_QSIZE, 0);
    let mut txq = DriverQueue::new(V_QSIZE, 0x4000);
    let evq = DriverQueue::new(V_QSIZE, 0x8000);
    let mut queues = [
        Queue::new(vsock::QUEUE_SIZE),
        Queue::new(vsock::QUEUE_SIZE),
        Queue::new(vsock::QUEUE_SIZE),
    ];
    rxq.configure(&mut queues[0]);
    txq.configure(&mut queues[1]);
    evq.configure(&mut queues[2]);
    for q in &queues {
        q.validate(&mem).unwrap();
    }
    mem.set_policy(Some(Policy::for_queues(&[
        (rxq.desc, rxq.avail, rxq.used, V_QSIZE),
        (txq.desc, txq.avail, txq.used, V_QSIZE),
        (evq.desc, evq.avail, evq.used, V_QSIZE),
    ])));
    let mut backend = FakeVsock {
        liar: c.liar,
        ..FakeVsock::default()
    };
    for &(op, len) in &c.outbox {
        let hdr = PacketHeader {
            src_cid: vsock::HOST_CID,
            dst_cid: CID,
            op,
            type_: vsock::TYPE_STREAM,
            ..PacketHeader::default()
        };
        backend.outbox.push_back((hdr, pattern(len, len as u64)));
    }
    let mut dev = Vsock::new(CID, backend);
    let mut caps = Vec::new();
    let post_rx = |rxq: &mut DriverQueue, caps: &mut Vec<u64>| {
        for bufs in c.rx.iter().take(usize::from(V_QSIZE) / 4) {
            caps.push(
                bufs.iter()
                    .filter(|b| b.2)
                    .map(|b| u64::from(b.1))
                    .sum::<u64>(),
            );
            rxq.add(&mem.inner, bufs);
        }
    };
    if c.rx_first {
        post_rx(&mut rxq, &mut caps);
    }
    for sc in &c.tx {
        let bufs = sc.place(&mem);
        let descs = as_descs(&bufs);
        let want = model_vsock_tx(&mem, &descs);
        let sent_before = dev.backend().sent.len();
        txq.add(&mem.inner, &bufs);
        let r = dev.queue_notify(vsock::TX_QUEUE, &mut queues, &mem);
        mem.check_policy("vsock tx")?;
        if !ordered(&bufs) {
            prop_assert!(r.is_err());
            return Ok(());
        }
        prop_assert!(r.is_ok(), "{:?}", r);
        prop_assert_eq!(txq.used(&mem.inner).len(), 1);
        let sent = &dev.backend().sent[sent_before..];
        hit(match &want {
            None => "vsock_tx_rx.tx_dropped",
            Some((h, _)) if h.op == vsock::op::RST && h.len == 0 => "vsock_tx_rx.tx_rst",
            Some(_) => "vsock_tx_rx.tx_sent",
        });
        match want {
            None => prop_assert!(
                sent.is_empty(),
                "passed on a packet that should have been dropped: {:?}",
                sent[0].0
            ),
            Some((h, p)) => {
                prop_assert_eq!(sent.len(), 1, "nothing reached the backend");
                prop_assert_eq!(sent[0].0, h);
                same_bytes("payload", &sent[0].1, &p)?;
            }
        }
    }
    if !c.rx_first {
        post_rx(&mut rxq, &mut caps);
    }
    let r1 = dev.queue_notify(vsock::RX_QUEUE, &mut queues, &mem);
    let r2 = dev.backend_ready(&mut queues, &mem);
    mem.check_policy("vsock rx")?;
    prop_assert!(r1.is_ok() && r2.is_ok(), "{:?} {:?}", r1, r2);
    for ((_, len), cap) in rxq.used(&mem.inner).into_iter().zip(caps) {
        hit(if len > 0 {
            "vsock_tx_rx.rx_delivered"
        } else {
            "vsock_tx_rx.rx_empty"
        });
        prop_assert!(u64::from(len) <= cap, "used length {} > room {}", len, cap);
        prop_assert!(
            len == 0 || len as usize >= vsock::HDR_LEN,
            "a {}-byte packet",
            len
        );
    }
    Ok(())
}

#[test]
fn vsock_tx_rx() {
    run_property("vsock_tx_rx", 1000, vsock_case(), vsock_property);
}
