//! Randomized tests, driven by a small deterministic PRNG (no proptest dependency: the
//! sequences are reproducible from the seed printed on failure).
//!
//! - The mapping database: after any sequence of map/grant/unmap/task deletion among
//!   several tasks, no task keeps access to a page whose mapping was revoked, every
//!   mapping's rights are a subset of its parent's, and the mirrored page tables equal
//!   the database.
//! - The dispatcher: random register values and random arch events (ticks, interrupts,
//!   faults) never panic and never break a kernel invariant.

use std::format;
use std::vec::Vec;

use crate::abi::{Fpage, MapItem, MsgTag, Rights, Sysno, TaskId, ThreadId, Timeout, MR_COUNT};
use crate::kernel::Next;
use crate::mapdb::{At, MapDb};
use crate::testing::*;
use crate::thread::State;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn rights(&mut self) -> Rights {
        Rights::from_bits(self.below(8)).unwrap()
    }
}

const TASKS: u16 = 5;
const PAGES: u64 = 8;

fn rights_at(pt: &Mirror, at: At) -> Rights {
    pt.pt.get(&(at.task, at.vpn)).map_or(Rights::NONE, |&(_, r)| r)
}

#[test]
fn mapdb_revocation_property() {
    for seed in 0..400 {
        let mut rng = Rng(seed);
        let mut db = MapDb::new(TASKS as usize, 24 + rng.below(40) as usize, (0, PAGES));
        let mut pt = Mirror::default();
        for p in 0..4 {
            db.insert_root(&mut pt, At { task: TaskId(0), vpn: p }, 0x900 + p, Rights::ALL)
                .unwrap();
        }
        for step in 0..150 {
            let ctx = || format!("seed {seed} step {step}");
            let task = TaskId(rng.below(TASKS as u64) as u16);
            let order = rng.below(3) as u32;
            let vpn = rng.below(PAGES) & !((1 << order) - 1);
            let rights = rng.rights();
            match rng.below(10) {
                // unmap: everything derived (and the own mappings if asked) loses `rights`
                0..=2 => {
                    let own = rng.chance(50);
                    let mut revoked = Vec::new();
                    for v in vpn..vpn + (1 << order) {
                        let at = At { task, vpn: v };
                        revoked.extend(db.derived(at));
                        if own && db.lookup(at).is_some() && !db.is_root(at) {
                            revoked.push(at);
                        }
                    }
                    db.unmap(&mut pt, task, vpn, order, rights, own);
                    for at in revoked {
                        assert!(
                            rights_at(&pt, at).and(rights).is_empty(),
                            "{}: {at:?} kept revoked rights",
                            ctx()
                        );
                    }
                }
                // task deletion: the task and everything derived from it lose everything
                3 if task.0 != 0 && rng.chance(30) => {
                    let mut revoked: Vec<At> = (0..PAGES).map(|v| At { task, vpn: v }).collect();
                    for v in 0..PAGES {
                        revoked.extend(db.derived(At { task, vpn: v }));
                    }
                    db.clear(&mut pt, task);
                    for at in revoked {
                        assert_eq!(
                            rights_at(&pt, at),
                            Rights::NONE,
                            "{}: {at:?} survived its task",
                            ctx()
                        );
                    }
                }
                // map or grant, to a random place of a random task
                _ => {
                    let grant = rng.chance(40);
                    let dst_task = TaskId(rng.below(TASKS as u64) as u16);
                    let order = if grant { 0 } else { order };
                    let dst = rng.below(PAGES) & !((1 << order) - 1);
                    let (src_at, dst_at) = (At { task, vpn }, At { task: dst_task, vpn: dst });
                    let before = db.lookup(src_at);
                    // order 0: predict what a successful operation must do
                    let replaced = (order == 0
                        && before.is_some_and(|(_, r)| !r.and(rights).is_empty())
                        && !db.derives_from(src_at, dst_at)
                        && !db.is_root(dst_at))
                    .then(|| db.derived(dst_at));
                    let moves = grant && replaced.is_some() && !db.is_root(src_at);
                    let result = db.transfer(&mut pt, src_at, dst_at, order, rights, grant);
                    if result.is_ok() {
                        if let (Some(old), Some((pfn, r))) = (replaced, before) {
                            for at in old.into_iter().filter(|&at| at != src_at) {
                                if !db.derives_from(at, src_at) {
                                    assert_eq!(
                                        rights_at(&pt, at),
                                        Rights::NONE,
                                        "{}: replaced mapping's child {at:?}",
                                        ctx()
                                    );
                                }
                            }
                            let got = db.lookup(dst_at).unwrap();
                            assert_eq!(got.0, pfn, "{}", ctx());
                            assert!(got.1.contains(r.and(rights)), "{}", ctx());
                            if moves {
                                assert_eq!(
                                    db.lookup(src_at),
                                    None,
                                    "{}: the granter kept the page",
                                    ctx()
                                );
                                assert_eq!(got.1, r.and(rights), "{}", ctx());
                            }
                        }
                    }
                }
            }
            db.check();
            assert_eq!(
                pt.entries(),
                db.entries(),
                "{}: page tables differ from the database",
                ctx()
            );
            for p in 0..4 {
                assert_eq!(
                    db.lookup(At { task: TaskId(0), vpn: p }),
                    Some((0x900 + p, Rights::ALL)),
                    "{}: owner lost a frame",
                    ctx()
                );
            }
        }
    }
}

/// A register value that is often meaningful for `k`.
fn word(rng: &mut Rng, k: &K) -> u64 {
    match rng.below(12) {
        0 => rng.next(),
        1 => rng.below(16),
        2..=4 => thread(rng, k),
        5 => ThreadId::NIL.raw(),
        6 => ThreadId::ANY.raw(),
        7 => ThreadId::irq(rng.below(6) as u16).raw(),
        8 => fpage(rng).raw(),
        9 => Timeout::pair(timeout(rng), timeout(rng)),
        10 => u64::MAX - rng.below(2),
        _ => 0x10_0000 + rng.below(0x2_0000),
    }
}

/// A live thread, sometimes a stale or malformed id.
fn thread(rng: &mut Rng, k: &K) -> u64 {
    let live: Vec<ThreadId> =
        k.threads.iter().filter(|t| t.state != State::Free).map(|t| t.id).collect();
    match rng.below(20) {
        0 => ThreadId::new(rng.below(20) as u16, rng.below(3) as u16).raw(),
        _ => live[rng.below(live.len() as u64) as usize].raw(),
    }
}

/// Arguments shaped for system call `nr`, with an occasional random word among them.
fn args(rng: &mut Rng, k: &K, nr: u64) -> [u64; 4] {
    let mut a = match Sysno::from_raw(nr) {
        Some(Sysno::Ipc) => {
            let to = if rng.chance(30) { ThreadId::NIL.raw() } else { thread(rng, k) };
            let from = [
                ThreadId::NIL.raw(),
                ThreadId::ANY.raw(),
                ThreadId::irq(rng.below(5) as u16).raw(),
                thread(rng, k),
            ];
            let window =
                [Fpage::NIL, Fpage::complete(Rights::ALL), fpage(rng)][rng.below(3) as usize];
            [
                to,
                from[rng.below(4) as usize],
                Timeout::pair(timeout(rng), timeout(rng)),
                window.raw(),
            ]
        }
        Some(Sysno::Unmap) => [fpage(rng).raw(), rng.below(2), 0, 0],
        Some(Sysno::ThreadSwitch) => [if rng.chance(50) { 0 } else { thread(rng, k) }, 0, 0, 0],
        Some(Sysno::Schedule) => [
            thread(rng, k),
            [rng.below(40), u64::MAX][rng.below(2) as usize],
            [1 + rng.below(5), u64::MAX][rng.below(2) as usize],
            0,
        ],
        Some(Sysno::ExchangeRegisters) => [thread(rng, k), rng.below(32), rng.next(), rng.next()],
        Some(Sysno::ThreadControl) => {
            [[0, 0, 1, 2, 3][rng.below(5) as usize], thread(rng, k), thread(rng, k), thread(rng, k)]
        }
        Some(Sysno::TaskNew) => [thread(rng, k), 0x40_0000, 0x50_0000, rng.below(3)],
        Some(Sysno::IrqControl) => [rng.below(3), rng.below(6), thread(rng, k), 0],
        Some(Sysno::DebugWrite) => [0x10_0000 + rng.below(0x1_2000), rng.below(300), 0, 0],
        Some(Sysno::GuestRoute) => [
            thread(rng, k),
            rng.below(4) << 12,
            rng.below(3) << 32 | rng.below(0x3000),
            if rng.chance(30) { 0 } else { thread(rng, k) },
        ],
        Some(Sysno::GuestInterrupt) => [thread(rng, k), rng.below(1 << 25), 0, 0],
        None => [rng.next(), rng.next(), rng.next(), rng.next()],
    };
    if rng.chance(20) {
        a[rng.below(4) as usize] = word(rng, k);
    }
    a
}

fn timeout(rng: &mut Rng) -> Timeout {
    [Timeout::ZERO, Timeout(1 + rng.below(4) as u32), Timeout::NEVER][rng.below(3) as usize]
}

fn fpage(rng: &mut Rng) -> Fpage {
    let log2 = [12, 12, 13, 14, 16, 22, 64][rng.below(7) as usize];
    let base = if log2 == 64 {
        0
    } else {
        [0x10_0000, 0x40_0000, 0x1000][rng.below(3) as usize] & !((1 << log2) - 1)
    };
    Fpage::new(base, log2, rng.rights()).unwrap()
}

fn message(rng: &mut Rng, k: &K) -> [u64; MR_COUNT] {
    let mut m = [0; MR_COUNT];
    for w in m.iter_mut() {
        *w = word(rng, k);
    }
    if rng.chance(80) {
        let u = rng.below(4);
        let t = [0, 0, 2, 4][rng.below(4) as usize].min(MR_COUNT as u64 - 1 - u) & !1;
        m[0] = MsgTag::new(rng.below(4), u, t, 0).0;
        for k in (1 + u as usize..1 + (u + t) as usize).step_by(2) {
            let item =
                MapItem { grant: rng.chance(30), hotspot: rng.below(1 << 24), fpage: fpage(rng) };
            m[k..k + 2].copy_from_slice(&item.raw());
        }
    }
    m
}

#[test]
fn dispatcher_survives_random_registers() {
    let mut syscalls = 0;
    for seed in 0..150 {
        let mut rng = Rng(seed ^ 0xABCD);
        let (mut k, _) = boot();
        let mut idle = 0;
        for step in 0..600 {
            let Some(me) = k.current() else {
                idle += 1;
                if idle > 10 {
                    // everything is blocked for good: start over
                    (k, _) = boot();
                    continue;
                }
                let next = if rng.chance(50) { k.tick() } else { k.interrupt(rng.below(6) as u16) };
                assert_ne!(next, Next::Resume, "seed {seed} step {step}");
                k.check();
                continue;
            };
            idle = 0;
            match rng.below(100) {
                0..=69 => {
                    let nr = if rng.chance(95) { rng.below(9) } else { rng.next() };
                    let args = args(&mut rng, &k, nr);
                    let mrs = message(&mut rng, &k);
                    let regs = k.context_mut(me).unwrap();
                    (regs.nr, regs.args, regs.mrs) = (nr, args, mrs);
                    k.syscall();
                    syscalls += 1;
                }
                70..=79 => {
                    k.tick();
                }
                80..=89 => {
                    k.interrupt(rng.below(6) as u16);
                }
                90..=96 => {
                    let addr = [
                        rng.next(),
                        0x40_0000 + rng.below(0x40_0000),
                        0x10_0000 + rng.below(0x1_0000),
                    ][rng.below(3) as usize];
                    k.page_fault(addr, rng.rights());
                }
                _ => {
                    k.exception(rng.below(32), rng.next());
                }
            }
            k.check();
            assert_eq!(k.machine.mirror.entries(), k.mapdb.entries(), "seed {seed} step {step}");
        }
    }
    assert!(syscalls > 30_000, "only {syscalls} system calls ran");
}

#[test]
fn decoder_is_total() {
    let mut rng = Rng(7);
    for _ in 0..200_000 {
        let nr = if rng.chance(50) { rng.below(12) } else { rng.next() };
        let a = [rng.next(), rng.next(), rng.next(), rng.next()];
        let _ = crate::Syscall::decode(nr, a);
        let _ = Fpage::from_raw(a[0]);
        let _ = MapItem::from_raw(a[1], a[2]);
        let _ = ThreadId::from_raw(a[3]).map(ThreadId::kind);
    }
    assert_eq!(crate::Syscall::decode(11, [0; 4]), Err(crate::abi::Error::UnknownSyscall));
    assert_eq!(
        crate::Syscall::decode(Sysno::Ipc as u64, [1 << 32, 0, 0, 0]),
        Err(crate::abi::Error::InvalidArgument)
    );
}
