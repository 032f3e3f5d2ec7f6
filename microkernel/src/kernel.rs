//! The kernel state and the boot interface.
//!
//! [`Kernel`] is all of the kernel's state in one value; every entry point is a method
//! that changes it and returns [`Next`], which tells the arch layer what to run. Thread
//! and task references inside the state are table indices; ids with generations
//! ([`ThreadId`]) are used at the boundary and wherever a reference may outlive its
//! target.

use alloc::vec::Vec;

use crate::abi::{Error, Rights, TaskId, ThreadId, PAGE_BITS};
use crate::irq::Irq;
use crate::list::Links;
use crate::machine::{Context, Machine};
use crate::mapdb::{At, MapDb};
use crate::sched::Sched;
use crate::syscalls::TaskKind;
use crate::task::Task;
use crate::thread::{State, Thread};

/// Table sizes and policy, fixed at boot.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Thread table size (at most `ThreadId::MAX_INDEX + 1`).
    pub threads: u16,
    /// Task table size.
    pub tasks: u16,
    /// Mapping-database nodes, i.e. mapped pages in all tasks together.
    pub mappings: u32,
    /// Interrupt lines that threads can attach to (fewer than 0xFFFF).
    pub irqs: u16,
    /// User virtual addresses: `user_start..user_end`, page aligned. Nothing is ever
    /// mapped outside.
    pub user_start: u64,
    pub user_end: u64,
    /// Default time slice in timer ticks.
    pub timeslice: u32,
    /// Priority of the root thread (0..=255, higher runs first).
    pub root_priority: u8,
}

/// What the arch layer runs after a kernel entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Return to the thread that entered the kernel (its context may have changed).
    Resume,
    /// Run `thread` of address space `task` from its saved context.
    Switch { thread: ThreadId, task: TaskId },
    /// Nothing is ready: wait for an interrupt.
    Idle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    BadConfig,
    NoMemory,
}

pub struct Kernel<M: Machine> {
    /// The arch layer's own state; the core calls it through [`Machine`].
    pub machine: M,
    pub(crate) config: Config,
    pub(crate) threads: Vec<Thread<M::Context>>,
    /// Links of the per-thread sender queues (`Thread::senders`).
    pub(crate) senders: Links,
    pub(crate) tasks: Vec<Task>,
    pub(crate) mapdb: MapDb,
    pub(crate) sched: Sched,
    pub(crate) irqs: Vec<Irq>,
    /// How many lines in `irqs` are pending (lets IPC skip the scan when none is).
    pub(crate) irqs_pending: usize,
}

/// Index of the root task and of the root thread's slot.
pub(crate) const ROOT: usize = 0;

impl<M: Machine> Kernel<M> {
    /// Set up the tables, the root task (privileged, address space 0) and its halted
    /// first thread. Give it memory with [`Kernel::root_map`], then start it with
    /// [`Kernel::boot`].
    pub fn new(machine: M, config: Config) -> Result<Self, BootError> {
        let c = config;
        let aligned = |a: u64| a.is_multiple_of(1 << PAGE_BITS);
        if c.threads == 0
            || c.threads > ThreadId::MAX_INDEX
            || c.tasks == 0
            || c.irqs == u16::MAX
            || c.timeslice == 0
            || !(aligned(c.user_start) && aligned(c.user_end) && c.user_start < c.user_end)
        {
            return Err(BootError::BadConfig);
        }
        let user = (c.user_start >> PAGE_BITS, c.user_end >> PAGE_BITS);
        let mut threads = Vec::with_capacity(c.threads as usize);
        threads.resize_with(c.threads as usize, Thread::free);
        let mut kernel = Self {
            machine,
            config: c,
            threads,
            senders: Links::new(c.threads as usize),
            tasks: alloc::vec![Task::FREE; c.tasks as usize],
            mapdb: MapDb::new(c.tasks as usize, c.mappings as usize, user),
            sched: Sched::new(c.threads as usize),
            irqs: alloc::vec![Irq::NONE; c.irqs as usize],
            irqs_pending: 0,
        };
        // The tables are empty, so both land in slot 0 (`ROOT`).
        let task = kernel.create_task(TaskKind::Privileged).map_err(|_| BootError::NoMemory)?;
        kernel
            .create_thread(task, ThreadId::NIL, ThreadId::NIL, c.root_priority)
            .map_err(|_| BootError::NoMemory)?;
        Ok(kernel)
    }

    /// Make the root task the owner of physical page `paddr`, mapped at `vaddr`.
    pub fn root_map(&mut self, vaddr: u64, paddr: u64, rights: Rights) -> Result<(), Error> {
        let vpn = vaddr >> PAGE_BITS;
        if !(vaddr | paddr).is_multiple_of(1 << PAGE_BITS) {
            return Err(Error::InvalidArgument);
        }
        let at = At { task: TaskId(ROOT as u16), vpn };
        self.mapdb.insert_root(&mut self.machine, at, paddr >> PAGE_BITS, rights)
    }

    /// Start the root thread at `ip` with stack `sp`.
    pub fn boot(&mut self, ip: u64, sp: u64) -> Next {
        self.threads[ROOT].ctx.set_ip(ip);
        self.threads[ROOT].ctx.set_sp(sp);
        self.make_ready(ROOT);
        self.reschedule(None)
    }

    /// The root task's first thread, which `boot` starts.
    pub fn root_thread(&self) -> ThreadId {
        self.threads[ROOT].id
    }

    /// The running thread, whose context an entry from user mode saves into.
    pub fn current(&self) -> Option<ThreadId> {
        self.sched.current.map(|i| self.threads[i].id)
    }

    pub fn context(&self, t: ThreadId) -> Option<&M::Context> {
        self.live(t).map(|i| &self.threads[i].ctx)
    }

    pub fn context_mut(&mut self, t: ThreadId) -> Option<&mut M::Context> {
        self.live(t).map(|i| &mut self.threads[i].ctx)
    }

    pub fn task_of(&self, t: ThreadId) -> Option<TaskId> {
        self.live(t).map(|i| self.task_id(i))
    }

    /// The table index of live thread `id`.
    pub(crate) fn live(&self, id: ThreadId) -> Option<usize> {
        let i = id.0 as u16 as usize;
        let t = self.threads.get(i)?;
        (t.id == id && t.state != State::Free).then_some(i)
    }

    pub(crate) fn task_id(&self, i: usize) -> TaskId {
        TaskId(self.threads[i].task as u16)
    }

    pub(crate) fn privileged(&self, i: usize) -> bool {
        self.tasks[self.threads[i].task].privileged
    }
}

#[cfg(any(test, feature = "invariants"))]
impl<M: Machine> Kernel<M> {
    /// The ids of all live threads, in table order.
    pub fn live_threads(&self) -> Vec<ThreadId> {
        self.threads.iter().filter(|t| t.state != State::Free).map(|t| t.id).collect()
    }

    /// Every mapping in the database as `(task, vpn, pfn, rights)`, in page-table order.
    pub fn mappings(&self) -> Vec<(TaskId, u64, u64, Rights)> {
        self.mapdb.entries()
    }

    /// Check the consistency of all kernel state; panics on violation.
    pub fn check(&self) {
        use crate::thread::{Peer, Receive};
        self.mapdb.check();
        let mut per_task = alloc::vec![0u16; self.tasks.len()];
        for (i, t) in self.threads.iter().enumerate() {
            if t.state == State::Free {
                assert!(
                    !self.sched.is_queued(i) && !self.senders.is_linked(i) && t.senders.is_empty()
                );
                continue;
            }
            assert!(self.tasks[t.task].live, "thread {i} in dead task");
            per_task[t.task] += 1;
            let running = self.sched.current == Some(i);
            assert_eq!(
                t.state == State::Ready && !running,
                self.sched.is_queued(i),
                "thread {i} queueing"
            );
            match t.state {
                State::SendBlocked { to, .. } => {
                    let r = self.live(to).expect("send-blocked on a dead thread");
                    assert!(self.senders.iter(&self.threads[r].senders).any(|s| s == i));
                }
                State::RecvBlocked(Receive { from: Peer::Thread(s), .. }) => {
                    assert!(self.live(s).is_some(), "thread {i} receives from a dead thread");
                }
                State::RecvBlocked(Receive { from: Peer::Irq(n), .. }) => {
                    assert_eq!(
                        self.irqs[n as usize].handler, t.id,
                        "thread {i} receives from a foreign irq"
                    );
                }
                State::Faulted => assert!(t.fault.is_some()),
                State::Halted => assert!(t.fault.is_none()),
                State::InGuest => assert!(t.fault.is_none()),
                _ => {}
            }
            if self.tasks[t.task].guest {
                // a vCPU never runs in VM0; between exits it is in its guest
                assert!(
                    matches!(t.state, State::InGuest | State::Faulted)
                        || (t.fault.is_some()
                            && matches!(
                                t.state,
                                State::SendBlocked { .. } | State::RecvBlocked(_)
                            )),
                    "vCPU {i} in state {:?}",
                    t.state
                );
            } else {
                assert!(t.state != State::InGuest, "thread {i} of a VM0 task in a guest");
            }
            let blocked = matches!(t.state, State::SendBlocked { .. } | State::RecvBlocked(_));
            assert!(
                t.deadline.is_none() || blocked,
                "thread {i} has a deadline but is not blocked"
            );
            assert_eq!(t.deadline.is_some(), self.sched.armed(i, t.deadline));
            for s in self.senders.iter(&t.senders) {
                assert!(
                    matches!(self.threads[s].state, State::SendBlocked { to, .. } if to == t.id)
                );
            }
        }
        for (n, task) in self.tasks.iter().enumerate() {
            assert_eq!(task.threads, per_task[n], "task {n} thread count");
            assert_eq!(task.live, task.threads > 0, "task {n} liveness");
        }
        for irq in &self.irqs {
            assert!(irq.handler == ThreadId::NIL || self.live(irq.handler).is_some());
        }
        assert_eq!(self.irqs.iter().filter(|l| l.pending).count(), self.irqs_pending);
        if let Some(c) = self.sched.current {
            assert_eq!(self.threads[c].state, State::Ready, "current thread not ready");
        }
    }
}
