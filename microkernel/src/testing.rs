//! Test harness: a machine that mirrors page tables into a map, register contexts as
//! plain arrays, and helpers that run system calls as a given thread.

use std::collections::{BTreeMap, BTreeSet};
use std::vec::Vec;

use crate::abi::{
    Fpage, MsgTag, Rights, Sysno, TaskId, ThreadId, Timeout, ARG_COUNT, MR_COUNT, RET_COUNT,
};
use crate::kernel::{Config, Kernel, Next};
use crate::machine::{Machine, NoMemory, PageTables, Space};
use crate::mapdb::At;

/// Page tables as a map, checking that the core uses the interface as documented.
#[derive(Default, Debug)]
pub struct Mirror {
    pub pt: BTreeMap<(TaskId, u64), (u64, Rights)>,
    pub spaces: BTreeSet<TaskId>,
    pub guests: BTreeSet<TaskId>,
}

impl Mirror {
    pub fn entries(&self) -> Vec<(TaskId, u64, u64, Rights)> {
        self.pt.iter().map(|(&(t, v), &(p, r))| (t, v, p, r)).collect()
    }
}

impl PageTables for Mirror {
    fn create_space(&mut self, task: TaskId, kind: Space) -> Result<(), NoMemory> {
        assert!(self.spaces.insert(task), "space {task:?} created twice");
        if kind == Space::Guest {
            self.guests.insert(task);
        }
        Ok(())
    }
    fn destroy_space(&mut self, task: TaskId) {
        assert!(self.spaces.remove(&task));
        self.guests.remove(&task);
        assert!(!self.pt.keys().any(|&(t, _)| t == task), "space destroyed with pages mapped");
    }
    fn map(&mut self, task: TaskId, vpn: u64, pfn: u64, rights: Rights) -> Result<(), NoMemory> {
        assert!(!rights.is_empty());
        assert!(self.pt.insert((task, vpn), (pfn, rights)).is_none(), "map over a mapping");
        Ok(())
    }
    fn protect(&mut self, task: TaskId, vpn: u64, rights: Rights) {
        assert!(!rights.is_empty());
        self.pt.get_mut(&(task, vpn)).expect("protect of an unmapped page").1 = rights;
    }
    fn unmap(&mut self, task: TaskId, vpn: u64) {
        self.pt.remove(&(task, vpn)).expect("unmap of an unmapped page");
    }
}

/// A thread's user registers.
pub use crate::machine::HostRegs as Regs;

#[derive(Default, Debug)]
pub struct TestMachine {
    pub mirror: Mirror,
    pub masked: BTreeSet<u16>,
    pub console: Vec<(u64, u64, u64)>,
    /// `guest_resume` calls: (vCPU, task, value, interrupt lines pulsed).
    pub resumed: Vec<(ThreadId, TaskId, u64, u32)>,
    /// `guest_interrupt` calls: (task, pins).
    pub interrupted: Vec<(TaskId, u32)>,
}

impl PageTables for TestMachine {
    fn create_space(&mut self, task: TaskId, kind: Space) -> Result<(), NoMemory> {
        self.mirror.create_space(task, kind)
    }
    fn destroy_space(&mut self, task: TaskId) {
        self.mirror.destroy_space(task)
    }
    fn map(&mut self, task: TaskId, vpn: u64, pfn: u64, rights: Rights) -> Result<(), NoMemory> {
        self.mirror.map(task, vpn, pfn, rights)
    }
    fn protect(&mut self, task: TaskId, vpn: u64, rights: Rights) {
        self.mirror.protect(task, vpn, rights)
    }
    fn unmap(&mut self, task: TaskId, vpn: u64) {
        self.mirror.unmap(task, vpn)
    }
}

impl Machine for TestMachine {
    type Context = Regs;
    fn irq_mask(&mut self, irq: u16) {
        self.masked.insert(irq);
    }
    fn irq_unmask(&mut self, irq: u16) {
        self.masked.remove(&irq);
    }
    fn debug_write(&mut self, pfn: u64, offset: u64, len: u64) {
        self.console.push((pfn, offset, len));
    }
    fn guest_resume(&mut self, vcpu: ThreadId, task: TaskId, value: u64, pulse: u32) {
        assert!(self.mirror.guests.contains(&task), "resume of a vCPU outside a guest");
        self.resumed.push((vcpu, task, value, pulse));
    }
    fn guest_interrupt(&mut self, task: TaskId, pins: u32) {
        assert!(self.mirror.guests.contains(&task), "interrupt for a task that is no guest");
        self.interrupted.push((task, pins));
    }
}

pub type K = Kernel<TestMachine>;

pub const ANY: ThreadId = ThreadId::ANY;
pub const NIL: ThreadId = ThreadId::NIL;
pub const NEVER: Timeout = Timeout::NEVER;
pub const ZERO: Timeout = Timeout::ZERO;

/// What the kernel returns when it switches to thread `t`.
pub fn switch(k: &K, t: ThreadId) -> Next {
    Next::Switch { thread: t, task: k.task_of(t).unwrap() }
}

pub const USER_START: u64 = 0x1000;
pub const USER_END: u64 = 0x8000_0000_0000;
/// The root task owns frames `0x100..0x100 + ROOT_PAGES`, mapped 1:1.
pub const ROOT_PAGES: u64 = 16;

pub fn config() -> Config {
    Config {
        threads: 16,
        tasks: 8,
        mappings: 256,
        irqs: 4,
        user_start: USER_START,
        user_end: USER_END,
        timeslice: 3,
        root_priority: 10,
    }
}

/// A booted kernel whose root thread (priority 10) is running.
pub fn boot() -> (K, ThreadId) {
    let mut k = Kernel::new(TestMachine::default(), config()).unwrap();
    for p in 0x100..0x100 + ROOT_PAGES {
        k.root_map(p << 12, p << 12, Rights::ALL).unwrap();
    }
    let root = k.root_thread();
    assert_eq!(k.boot(0x1000, 0x2000), Next::Switch { thread: root, task: TaskId(0) });
    k.check();
    (k, root)
}

/// Run system call `nr` as `me`, which must be the running thread.
pub fn sys(
    k: &mut K,
    me: ThreadId,
    nr: Sysno,
    args: [u64; ARG_COUNT],
    mrs: [u64; MR_COUNT],
) -> Next {
    assert_eq!(k.current(), Some(me), "system call by a thread that is not running");
    let regs = k.context_mut(me).unwrap();
    regs.nr = nr as u64;
    regs.args = args;
    regs.mrs = mrs;
    regs.ret = [u64::MAX; RET_COUNT];
    let next = k.syscall();
    k.check();
    next
}

/// Run `ipc` as `me`.
pub fn ipc(
    k: &mut K,
    me: ThreadId,
    to: ThreadId,
    from: ThreadId,
    send: Timeout,
    recv: Timeout,
    mrs: [u64; MR_COUNT],
) -> Next {
    let window = Fpage::new(0x40_0000, 22, Rights::ALL).unwrap();
    sys(k, me, Sysno::Ipc, [to.raw(), from.raw(), Timeout::pair(send, recv), window.raw()], mrs)
}

/// A message with `label` and untyped `words`.
pub fn msg(label: u64, words: &[u64]) -> [u64; MR_COUNT] {
    let mut m = [0; MR_COUNT];
    m[0] = MsgTag::new(label, words.len() as u64, 0, 0).0;
    m[1..=words.len()].copy_from_slice(words);
    m
}

pub fn regs(k: &K, t: ThreadId) -> Regs {
    k.context(t).unwrap().clone()
}

/// A new ready thread at `prio` in the task of `near`, paged by `pager`, created
/// directly (not through a system call).
pub fn spawn(k: &mut K, near: ThreadId, prio: u8, pager: ThreadId) -> ThreadId {
    let task = k.task_of(near).unwrap().0 as usize;
    let root = k.root_thread();
    let i = k.create_thread(task, pager, root, prio).unwrap();
    k.make_ready(i);
    k.threads[i].id
}

/// A new task with one ready thread at `prio`, paged by `pager`, supervised by root.
pub fn spawn_task(k: &mut K, prio: u8, pager: ThreadId) -> ThreadId {
    let task = k.create_task(crate::TaskKind::User).unwrap();
    let root = k.root_thread();
    let i = k.create_thread(task, pager, root, prio).unwrap();
    k.make_ready(i);
    k.threads[i].id
}

/// Let the scheduler pick (as after an interrupt that changed nothing).
pub fn settle(k: &mut K) -> Option<ThreadId> {
    k.reschedule(None);
    k.check();
    k.current()
}

/// The control block of live thread `t`.
pub fn tcb(k: &mut K, t: ThreadId) -> &mut crate::thread::Thread<Regs> {
    let i = k.live(t).unwrap();
    &mut k.threads[i]
}

/// Map page `vpn` of `from`'s task at `dst` in `to`'s task, directly in the database.
pub fn give(k: &mut K, from: ThreadId, vpn: u64, to: ThreadId, dst: u64, rights: Rights) {
    let src = At { task: k.task_of(from).unwrap(), vpn };
    let dst = At { task: k.task_of(to).unwrap(), vpn: dst };
    k.mapdb.transfer(&mut k.machine, src, dst, 0, rights, false).unwrap();
}
