//! The microkernel's portable core (`microkernel::Kernel`): bytes become a sequence of
//! kernel entries — system calls with arbitrary register values (shaped or raw) issued
//! by whichever thread is running, plus timer ticks, device interrupts, page faults and
//! exceptions — against a small booted kernel. System calls go through the IPC fast
//! path first when the input says so, as the x86_64 arch layer does. After every entry: the kernel's own
//! invariant checker (`Kernel::check`, feature `invariants`), the mirrored page tables
//! equal the mapping database, the machine interface is used as documented, and the
//! returned `Next` agrees with the scheduler.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use microkernel::abi::{
    guest, Fpage, MapItem, MsgTag, Rights, TaskId, ThreadId, Timeout, ARG_COUNT, MR_COUNT,
};
use microkernel::{
    Config, GuestExit, HostRegs as Regs, Kernel, Machine, Next, NoMemory, PageTables, Space,
};

// ---------------------------------------------------------------------------------------
// The machine
// ---------------------------------------------------------------------------------------

/// Page tables as a map, panicking if the core misuses the interface.
#[derive(Default)]
struct FuzzMachine {
    pt: BTreeMap<(TaskId, u64), (u64, Rights)>,
    spaces: BTreeSet<TaskId>,
    guests: BTreeSet<TaskId>,
    masked: BTreeSet<u16>,
    irqs: u16,
    user: (u64, u64),
    /// Page-table memory runs out after this many more entries (None: never).
    pt_budget: Option<u32>,
}

impl PageTables for FuzzMachine {
    fn create_space(&mut self, task: TaskId, kind: Space) -> Result<(), NoMemory> {
        assert!(self.spaces.insert(task), "space {task:?} created twice");
        if kind == Space::Guest {
            self.guests.insert(task);
        }
        Ok(())
    }
    fn destroy_space(&mut self, task: TaskId) {
        assert!(
            self.spaces.remove(&task),
            "destroying unknown space {task:?}"
        );
        self.guests.remove(&task);
        assert!(
            !self.pt.keys().any(|&(t, _)| t == task),
            "space destroyed with pages mapped"
        );
    }
    fn map(&mut self, task: TaskId, vpn: u64, pfn: u64, rights: Rights) -> Result<(), NoMemory> {
        assert!(!rights.is_empty(), "map with no rights");
        assert!(
            self.spaces.contains(&task),
            "map into unknown space {task:?}"
        );
        if self.guests.contains(&task) {
            assert!(
                vpn < guest::PHYS_END >> 12,
                "map outside guest RAM: vpn {vpn:#x}"
            );
        } else {
            assert!(
                (self.user.0..self.user.1).contains(&vpn),
                "map outside user space: vpn {vpn:#x}"
            );
        }
        if let Some(b) = self.pt_budget.as_mut() {
            if *b == 0 {
                return Err(NoMemory);
            }
            *b -= 1;
        }
        assert!(
            self.pt.insert((task, vpn), (pfn, rights)).is_none(),
            "map over a mapping"
        );
        Ok(())
    }
    fn protect(&mut self, task: TaskId, vpn: u64, rights: Rights) {
        assert!(!rights.is_empty(), "protect to no rights");
        self.pt
            .get_mut(&(task, vpn))
            .expect("protect of an unmapped page")
            .1 = rights;
    }
    fn unmap(&mut self, task: TaskId, vpn: u64) {
        self.pt
            .remove(&(task, vpn))
            .expect("unmap of an unmapped page");
    }
}

impl Machine for FuzzMachine {
    type Context = Regs;
    fn irq_mask(&mut self, irq: u16) {
        assert!(irq < self.irqs, "mask of unknown line {irq}");
        self.masked.insert(irq);
    }
    fn irq_unmask(&mut self, irq: u16) {
        assert!(irq < self.irqs, "unmask of unknown line {irq}");
        self.masked.remove(&irq);
    }
    fn guest_resume(&mut self, _vcpu: ThreadId, task: TaskId, _value: u64, _pulse: u32) {
        assert!(self.guests.contains(&task), "guest_resume outside a guest");
    }
    fn guest_interrupt(&mut self, task: TaskId, pins: u32) {
        assert!(self.guests.contains(&task), "guest_interrupt outside a guest");
        assert!(pins != 0 && pins >> 24 == 0, "guest_interrupt pins {pins:#x}");
    }
    fn debug_write(&mut self, _pfn: u64, offset: u64, len: u64) {
        assert!(
            offset < 4096 && offset + len <= 4096,
            "debug_write crosses a frame"
        );
    }
}

type K = Kernel<FuzzMachine>;

// ---------------------------------------------------------------------------------------
// Register values
// ---------------------------------------------------------------------------------------

const USER_START: u64 = 0x1000;
const USER_END: u64 = 0x8000_0000_0000;
const ROOT_FRAMES: u64 = 16;
const IRQS: u16 = 4;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Tmo {
    Zero,
    Ticks(u8),
    Never,
}

impl Tmo {
    fn get(self) -> Timeout {
        match self {
            Tmo::Zero => Timeout::ZERO,
            Tmo::Ticks(n) => Timeout(u32::from(n % 5)),
            Tmo::Never => Timeout::NEVER,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Fp {
    base: u8,
    log2: u8,
    rights: u8,
}

impl Fp {
    fn get(self) -> u64 {
        let log2 = [0u8, 12, 12, 13, 14, 16, 22, 64][usize::from(self.log2 % 8)];
        let rights = Rights::from_bits(u64::from(self.rights % 8)).unwrap();
        if log2 == 0 {
            return Fpage::NIL.raw();
        }
        let base = if log2 == 64 {
            0
        } else {
            [0x10_0000u64, 0x40_0000, 0x1000, 0x20_0000][usize::from(self.base % 4)]
                & !((1u64 << log2) - 1)
        };
        Fpage::new(base, log2, rights).map_or(0, Fpage::raw)
    }
}

/// One register value.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Word {
    Raw(u64),
    Small(u8),
    /// A live thread (by position in the thread table's live list).
    Thread(u8),
    /// A thread id that may be stale or malformed.
    Id {
        index: u8,
        gen: u8,
    },
    Nil,
    Any,
    Irq(u8),
    Fpage(Fp),
    Timeouts(Tmo, Tmo),
    NoChange,
    /// An address near the root task's pages.
    Addr(u16),
}

impl Word {
    fn get(self, live: &[ThreadId]) -> u64 {
        match self {
            Word::Raw(v) => v,
            Word::Small(v) => u64::from(v % 32),
            Word::Thread(i) => live[usize::from(i) % live.len()].raw(),
            Word::Id { index, gen } => {
                ThreadId::new(u16::from(index % 20), u16::from(gen % 4)).raw()
            }
            Word::Nil => ThreadId::NIL.raw(),
            Word::Any => ThreadId::ANY.raw(),
            Word::Irq(n) => ThreadId::irq(u16::from(n % (IRQS as u8 + 2))).raw(),
            Word::Fpage(f) => f.get(),
            Word::Timeouts(s, r) => Timeout::pair(s.get(), r.get()),
            Word::NoChange => u64::MAX,
            Word::Addr(o) => 0x10_0000 + u64::from(o) * 8,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Item {
    grant: bool,
    hotspot: u16,
    fpage: Fp,
}

/// Message registers: a well-formed tag with items, or anything.
#[derive(Arbitrary, Debug, Clone)]
enum Message {
    Tagged {
        label: u8,
        words: Vec<Word>,
        items: Vec<Item>,
        flags: u8,
    },
    Raw([Word; MR_COUNT]),
}

impl Message {
    fn get(&self, live: &[ThreadId]) -> [u64; MR_COUNT] {
        let mut m = [0u64; MR_COUNT];
        match self {
            Message::Raw(w) => {
                for (r, w) in m.iter_mut().zip(w) {
                    *r = w.get(live);
                }
            }
            Message::Tagged {
                label,
                words,
                items,
                flags,
            } => {
                let u = words.len().min(MR_COUNT - 1);
                let t = (items.len() * 2).min(MR_COUNT - 1 - u) & !1;
                m[0] = MsgTag::new(u64::from(*label % 4), u as u64, t as u64, u64::from(*flags)).0;
                for (k, w) in words.iter().take(u).enumerate() {
                    m[1 + k] = w.get(live);
                }
                for (j, it) in items.iter().take(t / 2).enumerate() {
                    let raw = Fpage::from_raw(it.fpage.get()).filter(|f| !f.is_nil());
                    let item = MapItem {
                        grant: it.grant,
                        hotspot: u64::from(it.hotspot) << 12,
                        fpage: raw.unwrap_or(Fpage::complete(Rights::ALL)),
                    };
                    m[1 + u + 2 * j..3 + u + 2 * j].copy_from_slice(&item.raw());
                }
            }
        }
        m
    }
}

/// A thread argument.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Who {
    /// A live thread other than the caller (the caller if it is alone).
    Live(u8),
    Me,
    Nil,
    Any,
    Irq(u8),
    Other(Word),
}

impl Who {
    fn get(self, live: &[ThreadId], me: ThreadId) -> u64 {
        match self {
            Who::Live(i) => {
                let others: Vec<_> = live.iter().filter(|&&t| t != me).collect();
                others
                    .get(usize::from(i) % others.len().max(1))
                    .map_or(me, |&&t| t)
                    .raw()
            }
            Who::Me => me.raw(),
            Who::Nil => ThreadId::NIL.raw(),
            Who::Any => ThreadId::ANY.raw(),
            Who::Irq(n) => ThreadId::irq(u16::from(n % (IRQS as u8 + 2))).raw(),
            Who::Other(w) => w.get(live),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Window {
    Nil,
    All,
    Fpage(Fp),
}

/// A system call: shaped like the ABI table (`microkernel/SYSCALLS.md`), with each
/// argument still free to be odd, or raw registers.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Call {
    Ipc {
        to: Who,
        from: Who,
        send: Tmo,
        recv: Tmo,
        window: Window,
    },
    Unmap {
        fpage: Fp,
        own: bool,
    },
    ThreadSwitch {
        to: Who,
    },
    Schedule {
        dest: Who,
        prio: Option<u8>,
        timeslice: Option<u8>,
    },
    ExchangeRegisters {
        dest: Who,
        flags: u8,
        ip: u16,
        sp: u16,
    },
    ThreadControl {
        op: u8,
        target: Who,
        pager: Who,
        supervisor: Who,
    },
    TaskNew {
        pager: Who,
        /// 0..4: user, privileged, guest, both (invalid)
        kind: u8,
    },
    IrqControl {
        op: u8,
        line: u8,
        thread: Who,
    },
    DebugWrite {
        addr: u16,
        len: u16,
    },
    Raw {
        nr: u8,
        raw_nr: Option<u64>,
        args: [Word; ARG_COUNT],
    },
}

impl Call {
    fn get(self, live: &[ThreadId], me: ThreadId) -> (u64, [u64; ARG_COUNT]) {
        let w = |x: Who| x.get(live, me);
        match self {
            Call::Ipc {
                to,
                from,
                send,
                recv,
                window,
            } => {
                let window = match window {
                    Window::Nil => Fpage::NIL.raw(),
                    Window::All => Fpage::complete(Rights::ALL).raw(),
                    Window::Fpage(f) => f.get(),
                };
                (
                    0,
                    [
                        w(to),
                        w(from),
                        Timeout::pair(send.get(), recv.get()),
                        window,
                    ],
                )
            }
            Call::Unmap { fpage, own } => (1, [fpage.get(), u64::from(own), 0, 0]),
            Call::ThreadSwitch { to } => (2, [w(to), 0, 0, 0]),
            Call::Schedule {
                dest,
                prio,
                timeslice,
            } => (
                3,
                [
                    w(dest),
                    prio.map_or(u64::MAX, u64::from),
                    timeslice.map_or(u64::MAX, |t| u64::from(t % 8)),
                    0,
                ],
            ),
            Call::ExchangeRegisters {
                dest,
                flags,
                ip,
                sp,
            } => (
                4,
                [w(dest), u64::from(flags % 32), u64::from(ip), u64::from(sp)],
            ),
            Call::ThreadControl {
                op,
                target,
                pager,
                supervisor,
            } => (5, [u64::from(op % 4), w(target), w(pager), w(supervisor)]),
            Call::TaskNew { pager, kind } => {
                (6, [w(pager), 0x40_0000, 0x50_0000, u64::from(kind % 4)])
            }
            Call::IrqControl { op, line, thread } => (
                7,
                [
                    u64::from(op % 3),
                    u64::from(line % (IRQS as u8 + 2)),
                    w(thread),
                    0,
                ],
            ),
            Call::DebugWrite { addr, len } => (
                8,
                [
                    0x10_0000 + u64::from(addr) % 0x1_2000,
                    u64::from(len % 300),
                    0,
                    0,
                ],
            ),
            Call::Raw { nr, raw_nr, args } => (
                raw_nr.unwrap_or(u64::from(nr % 10)),
                args.map(|a| a.get(live)),
            ),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Entry {
    /// A system call by the running thread; with `fast`, as the x86_64 arch layer does
    /// it: the IPC fast path first, the full path if that declines.
    Syscall {
        call: Call,
        msg: Message,
        fast: bool,
    },
    Tick,
    Interrupt(u8),
    PageFault {
        addr: Word,
        access: u8,
    },
    Exception {
        vector: u8,
        code: u64,
    },
    /// A guest vCPU (any thread id: most are no vCPU in a guest) exits.
    GuestExit {
        vcpu: Word,
        kind: u8,
        addr: u64,
        data: u64,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    timeslice: u8,
    root_priority: u8,
    mappings: u8,
    pt_budget: Option<u8>,
    /// Tasks the root thread creates with `task_new` before the entries run
    /// (privileged or not), each with the root as pager.
    spawn: Vec<bool>,
    entries: Vec<Entry>,
}

// ---------------------------------------------------------------------------------------
// The target
// ---------------------------------------------------------------------------------------

fn boot(input: &Input) -> K {
    let config = Config {
        threads: 16,
        tasks: 8,
        mappings: 32 + u32::from(input.mappings),
        irqs: IRQS,
        user_start: USER_START,
        user_end: USER_END,
        timeslice: 1 + u32::from(input.timeslice % 8),
        root_priority: input.root_priority,
    };
    let machine = FuzzMachine {
        irqs: IRQS,
        user: (USER_START >> 12, USER_END >> 12),
        ..FuzzMachine::default()
    };
    let mut k = Kernel::new(machine, config).unwrap();
    for p in 0x100..0x100 + ROOT_FRAMES {
        k.root_map(p << 12, p << 12, Rights::ALL).unwrap();
    }
    // Page-table memory may run short only after boot.
    k.machine.pt_budget = input.pt_budget.map(u32::from);
    let root = k.root_thread();
    assert_eq!(
        k.boot(0x1000, 0x2000),
        Next::Switch {
            thread: root,
            task: TaskId(0)
        }
    );
    k
}

fn check(k: &K, next: Next, entered_by: Option<ThreadId>) {
    k.check();
    let mirror: Vec<_> = k
        .machine
        .pt
        .iter()
        .map(|(&(t, v), &(p, r))| (t, v, p, r))
        .collect();
    assert_eq!(
        mirror,
        k.mappings(),
        "page tables differ from the mapping database"
    );
    match next {
        Next::Resume => {
            assert!(entered_by.is_some(), "Resume without a thread to resume");
            assert_eq!(
                k.current(),
                entered_by,
                "Resume, but another thread is current"
            );
        }
        Next::Switch { thread, task } => {
            assert_eq!(
                k.current(),
                Some(thread),
                "Switch to a thread that is not current"
            );
            assert_eq!(k.task_of(thread), Some(task), "Switch names the wrong task");
        }
        Next::Idle => assert_eq!(k.current(), None, "Idle with a current thread"),
    }
}

fuzz_target!(|input: Input| {
    let mut k = boot(&input);
    for &privileged in input.spawn.iter().take(4) {
        let root = k.root_thread();
        let regs = k.context_mut(root).unwrap();
        regs.nr = 6;
        regs.args = [root.raw(), 0x40_0000, 0x50_0000, u64::from(privileged)];
        let next = k.syscall();
        check(&k, next, Some(root));
        if k.current() != Some(root) {
            break;
        }
    }
    for e in input.entries.iter().take(512) {
        let live = k.live_threads();
        assert!(!live.is_empty(), "the root thread died");
        let me = k.current();
        let next = match e {
            Entry::Syscall { call, msg, fast } => {
                let Some(me) = me else {
                    // Nobody runs: only the timer and devices can enter the kernel.
                    let next = k.tick();
                    check(&k, next, None);
                    continue;
                };
                let (nr, args) = call.get(&live, me);
                let mrs = msg.get(&live);
                let regs = k.context_mut(me).unwrap();
                (regs.nr, regs.args, regs.mrs) = (nr, args, mrs);
                match fast.then(|| k.fastpath()).flatten() {
                    Some(next) => next,
                    None => k.syscall(),
                }
            }
            Entry::Tick => k.tick(),
            Entry::Interrupt(n) => k.interrupt(u16::from(*n) % (IRQS + 2)),
            Entry::PageFault { addr, access } => {
                if me.is_none() {
                    continue;
                }
                let access = Rights::from_bits(u64::from(access % 8)).unwrap();
                k.page_fault(addr.get(&live), access)
            }
            Entry::Exception { vector, code } => {
                if me.is_none() {
                    continue;
                }
                k.exception(u64::from(*vector % 32), *code)
            }
            Entry::GuestExit {
                vcpu,
                kind,
                addr,
                data,
            } => {
                let exit = GuestExit {
                    kind: *kind % 7,
                    size: 1 << (*kind >> 6),
                    addr: *addr,
                    data: *data,
                    pulse: 0,
                };
                k.guest_exit(ThreadId(vcpu.get(&live) as u32), exit)
            }
        };
        check(&k, next, me);
    }
});
