//! Threads: control blocks, states, creation, deletion and `exchange_registers`.
//!
//! A thread is always in exactly one [`State`]. Ready threads other than the running one
//! sit in their priority's ready queue; a send-blocked thread sits in its destination's
//! sender queue; blocked threads with a finite timeout sit in the timeout list. Every
//! state change goes through `make_ready`/`make_blocked` (sched) or `finish` (ipc),
//! which keep those memberships right.

use crate::abi::{exregs, Error, Fpage, ThreadId, Timeout};
use crate::fault::Fault;
use crate::kernel::{Kernel, ROOT};
use crate::list::Queue;
use crate::machine::{Context, Machine};
use crate::syscalls::{Control, SysResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The slot holds no thread.
    Free,
    /// Created but not started, or stopped by `exchange_registers`.
    Halted,
    /// Runnable (queued, or running if it is `sched.current`).
    Ready,
    /// Waiting for `to` to receive; afterwards receive as `then` (call, fault IPC).
    SendBlocked { to: ThreadId, then: Option<Receive> },
    /// Waiting for a message.
    RecvBlocked(Receive),
    /// A fault could not be delivered (no handler, or it died): stopped until resumed.
    Faulted,
    /// A vCPU thread whose guest runs (outside VM0; only guest tasks' threads).
    InGuest,
}

/// A receive phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receive {
    pub from: Peer,
    /// Where mappings sent to this thread may land (nil: none accepted).
    pub window: Fpage,
    pub timeout: Timeout,
}

/// Whom a receive phase accepts a message from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Any,
    Thread(ThreadId),
    Irq(u16),
}

pub struct Thread<C> {
    /// The id of this slot's thread (the last one, if free).
    pub id: ThreadId,
    pub task: usize,
    pub state: State,
    /// Saved user state, owned by the arch layer's entry code.
    pub ctx: C,
    pub prio: u8,
    pub timeslice: u32,
    pub remaining: u32,
    /// Receives this thread's page faults.
    pub pager: ThreadId,
    /// Receives this thread's exceptions (and page faults if the pager is gone).
    pub supervisor: ThreadId,
    /// The fault being handled (in fault IPC or `Faulted`).
    pub fault: Option<Fault>,
    /// When the current IPC phase times out (absolute tick).
    pub deadline: Option<u64>,
    /// Threads blocked sending to this one, in arrival order.
    pub senders: Queue,
}

impl<C: Context> Thread<C> {
    pub fn free() -> Self {
        Self {
            id: ThreadId::NIL,
            task: 0,
            state: State::Free,
            ctx: C::default(),
            prio: 0,
            timeslice: 0,
            remaining: 0,
            pager: ThreadId::NIL,
            supervisor: ThreadId::NIL,
            fault: None,
            deadline: None,
            senders: Queue::EMPTY,
        }
    }
}

impl<M: Machine> Kernel<M> {
    /// A new halted thread in `task`.
    pub(crate) fn create_thread(
        &mut self,
        task: usize,
        pager: ThreadId,
        supervisor: ThreadId,
        prio: u8,
    ) -> Result<usize, Error> {
        let i = self.threads.iter().position(|t| t.state == State::Free).ok_or(Error::NoMemory)?;
        let gen = match (self.threads[i].id.0 >> 16) as u16 {
            u16::MAX => 1,
            g => g + 1,
        };
        let timeslice = self.config.timeslice;
        self.threads[i] = Thread {
            id: ThreadId::new(i as u16, gen),
            task,
            state: State::Halted,
            prio,
            timeslice,
            remaining: timeslice,
            pager,
            supervisor,
            ..Thread::free()
        };
        self.tasks[task].threads += 1;
        Ok(i)
    }

    /// Delete thread `i`: its partners' IPC fails, its interrupts are detached, and its
    /// task goes with its last thread.
    pub(crate) fn delete_thread(&mut self, i: usize) {
        let id = self.threads[i].id;
        if let State::SendBlocked { to, .. } = self.threads[i].state {
            if let Some(r) = self.live(to) {
                self.senders.remove(&mut self.threads[r].senders, i);
            }
        }
        self.clear_deadline(i);
        self.make_blocked(i, State::Halted);
        // From here on `i` is not live: a guest exit its death sends elsewhere
        // (`redeliver`) must not find it again through a route.
        self.threads[i].id = ThreadId::NIL;
        while let Some(s) = self.senders.pop_front(&mut self.threads[i].senders) {
            self.finish(s, Err(Error::SendNotExist));
        }
        for j in 0..self.threads.len() {
            if let State::RecvBlocked(Receive { from: Peer::Thread(t), .. }) = self.threads[j].state
            {
                if t == id {
                    self.finish(j, Err(Error::RecvNotExist));
                }
            }
        }
        self.detach_irqs(id);
        let task = self.threads[i].task;
        self.threads[i] = Thread { id, ..Thread::free() };
        self.tasks[task].threads -= 1;
        if self.tasks[task].threads == 0 {
            self.destroy_task(task);
        }
    }

    /// `thread_control`: create, configure and delete threads (privileged).
    pub(crate) fn sys_thread_control(
        &mut self,
        me: usize,
        op: Control,
        target: ThreadId,
        pager: ThreadId,
        supervisor: ThreadId,
    ) -> SysResult {
        if !self.privileged(me) {
            return Err(Error::NoPermission);
        }
        let t = self.live(target).ok_or(Error::NotExist)?;
        let task = self.threads[t].task;
        match op {
            // One vCPU per guest for now: the machine runs one.
            Control::Create if self.tasks[task].guest => Err(Error::InvalidArgument),
            Control::Create => {
                let n = self.create_thread(task, pager, supervisor, self.threads[me].prio)?;
                Ok([self.threads[n].id.raw(), task as u64])
            }
            Control::Configure => {
                self.threads[t].pager = pager;
                self.threads[t].supervisor = supervisor;
                Ok([0, 0])
            }
            Control::Delete if task == ROOT && self.tasks[ROOT].threads == 1 => {
                Err(Error::NoPermission)
            }
            Control::Delete => {
                self.delete_thread(t);
                Ok([0, 0])
            }
            Control::DeleteTask if task == ROOT => Err(Error::NoPermission),
            Control::DeleteTask => {
                for j in 0..self.threads.len() {
                    if self.threads[j].state != State::Free && self.threads[j].task == task {
                        self.delete_thread(j);
                    }
                }
                Ok([0, 0])
            }
        }
    }

    /// `exchange_registers`: read and set ip/sp, cancel IPC, halt or resume a thread of
    /// the caller's own task (any thread if privileged). Returns the old ip and sp.
    pub(crate) fn sys_exchange_registers(
        &mut self,
        me: usize,
        dest: ThreadId,
        flags: u64,
        ip: u64,
        sp: u64,
    ) -> SysResult {
        let d = self.live(dest).ok_or(Error::NotExist)?;
        if self.threads[d].task != self.threads[me].task && !self.privileged(me) {
            return Err(Error::NoPermission);
        }
        if self.tasks[self.threads[d].task].guest {
            // A vCPU's registers live in its VM, and only its exits stop it.
            return Err(Error::InvalidArgument);
        }
        let old = [self.threads[d].ctx.ip(), self.threads[d].ctx.sp()];
        if flags & (exregs::CANCEL | exregs::HALT) != 0 {
            match self.threads[d].state {
                State::SendBlocked { .. } => self.finish(d, Err(Error::SendCanceled)),
                State::RecvBlocked(_) => self.finish(d, Err(Error::RecvCanceled)),
                _ => {}
            }
        }
        if flags & exregs::SET_IP != 0 {
            self.threads[d].ctx.set_ip(ip);
        }
        if flags & exregs::SET_SP != 0 {
            self.threads[d].ctx.set_sp(sp);
        }
        if flags & exregs::HALT != 0 {
            self.threads[d].fault = None;
            self.make_blocked(d, State::Halted);
        }
        if flags & exregs::RESUME != 0
            && matches!(self.threads[d].state, State::Halted | State::Faulted)
        {
            self.threads[d].fault = None;
            self.make_ready(d);
        }
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    use crate::abi::{exregs, thread_control, Error, Sysno, ThreadId, Timeout};
    use crate::testing::*;
    use crate::thread::State;
    use crate::Next;

    fn control(k: &mut K, me: ThreadId, op: u64, target: ThreadId, pager: ThreadId) -> Next {
        sys(k, me, Sysno::ThreadControl, [op, target.raw(), pager.raw(), me.raw()], msg(0, &[]))
    }

    #[test]
    fn create_and_start() {
        let (mut k, root) = boot();
        assert_eq!(control(&mut k, root, thread_control::CREATE, root, NIL), Next::Resume);
        let [status, id, task] = regs(&k, root).ret;
        let t = ThreadId(id as u32);
        assert_eq!((status, task, k.task_of(t)), (0, 0, k.task_of(root)));
        assert_eq!(k.threads[k.live(t).unwrap()].state, State::Halted);
        let start = [t.raw(), exregs::SET_IP | exregs::SET_SP | exregs::RESUME, 0x1000, 0x2000];
        assert_eq!(sys(&mut k, root, Sysno::ExchangeRegisters, start, msg(0, &[])), Next::Resume);
        assert_eq!((regs(&k, t).ip, regs(&k, t).sp), (0x1000, 0x2000));
        assert_eq!(sys(&mut k, root, Sysno::ThreadSwitch, [0; 4], msg(0, &[])), switch(&k, t));
        // an unprivileged task may neither create threads nor touch others' threads
        let u = spawn_task(&mut k, 30, NIL);
        assert_eq!(settle(&mut k), Some(u));
        assert_eq!(control(&mut k, u, thread_control::CREATE, u, NIL), Next::Resume);
        assert_eq!(regs(&k, u).ret[0], Error::NoPermission as u64);
        assert_eq!(
            sys(&mut k, u, Sysno::ExchangeRegisters, [t.raw(), exregs::HALT, 0, 0], msg(0, &[])),
            Next::Resume
        );
        assert_eq!(regs(&k, u).ret[0], Error::NoPermission as u64);
    }

    #[test]
    fn deleting_a_partner_fails_its_ipc() {
        let (mut k, root) = boot();
        let server = spawn(&mut k, root, 20, NIL);
        let c1 = spawn(&mut k, root, 30, NIL);
        let c2 = spawn(&mut k, root, 30, NIL);
        assert_eq!(settle(&mut k), Some(c1));
        assert_eq!(ipc(&mut k, c1, server, server, NEVER, NEVER, msg(0, &[])), switch(&k, c2));
        assert_eq!(ipc(&mut k, c2, server, server, NEVER, NEVER, msg(0, &[])), switch(&k, server));
        // the server takes c1's request, then dies before replying
        assert_eq!(
            ipc(&mut k, server, NIL, ThreadId::ANY, Timeout::ZERO, NEVER, msg(0, &[])),
            Next::Resume
        );
        assert_eq!(
            sys(
                &mut k,
                server,
                Sysno::ExchangeRegisters,
                [server.raw(), exregs::HALT, 0, 0],
                msg(0, &[])
            ),
            switch(&k, root)
        );
        assert_eq!(control(&mut k, root, thread_control::DELETE, server, NIL), switch(&k, c2));
        assert_eq!(regs(&k, c1).ret[0], Error::RecvNotExist as u64, "c1 waited for the reply");
        assert_eq!(regs(&k, c2).ret[0], Error::SendNotExist as u64, "c2 waited to send");
        // the stale id stays dead even when the slot is reused
        let again = spawn(&mut k, root, 5, NIL);
        assert_eq!(k.live(again).map(|i| i as u16), Some(server.0 as u16));
        assert_ne!(again, server);
        assert_eq!(ipc(&mut k, c2, server, NIL, NEVER, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, c2).ret[0], Error::SendNotExist as u64);
    }

    #[test]
    fn cancel_halt_resume() {
        let (mut k, root) = boot();
        let t = spawn(&mut k, root, 30, NIL);
        assert_eq!(settle(&mut k), Some(t));
        assert_eq!(
            ipc(&mut k, t, NIL, ThreadId::ANY, Timeout::ZERO, NEVER, msg(0, &[])),
            switch(&k, root)
        );
        assert_eq!(
            sys(
                &mut k,
                root,
                Sysno::ExchangeRegisters,
                [t.raw(), exregs::CANCEL, 0, 0],
                msg(0, &[])
            ),
            switch(&k, t)
        );
        assert_eq!(regs(&k, t).ret[0], Error::RecvCanceled as u64);
        assert_eq!(
            sys(&mut k, t, Sysno::ExchangeRegisters, [t.raw(), exregs::HALT, 0, 0], msg(0, &[])),
            switch(&k, root)
        );
        assert_eq!(k.tick(), Next::Resume);
        let bad = [t.raw(), exregs::HALT | exregs::RESUME, 0, 0];
        assert_eq!(sys(&mut k, root, Sysno::ExchangeRegisters, bad, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, root).ret[0], Error::InvalidArgument as u64);
        assert_eq!(
            sys(
                &mut k,
                root,
                Sysno::ExchangeRegisters,
                [t.raw(), exregs::RESUME, 0, 0],
                msg(0, &[])
            ),
            switch(&k, t)
        );
    }

    #[test]
    fn delete_task_takes_its_mappings() {
        let (mut k, root) = boot();
        let a = spawn_task(&mut k, 5, root);
        let a2 = spawn(&mut k, a, 5, root);
        let task = k.task_of(a).unwrap();
        give(&mut k, root, 0x100, a, 0x400, crate::abi::Rights::RW);
        assert!(k.machine.mirror.pt.keys().any(|&(t, _)| t == task));
        assert_eq!(control(&mut k, root, thread_control::DELETE_TASK, a2, NIL), Next::Resume);
        assert_eq!((k.task_of(a), k.task_of(a2)), (None, None));
        assert!(!k.machine.mirror.spaces.contains(&task));
        assert!(!k.machine.mirror.pt.keys().any(|&(t, _)| t == task));
        assert_eq!(control(&mut k, root, thread_control::DELETE_TASK, root, NIL), Next::Resume);
        assert_eq!(regs(&k, root).ret[0], Error::NoPermission as u64, "the root task stays");
        assert_eq!(control(&mut k, root, thread_control::DELETE, root, NIL), Next::Resume);
        assert_eq!(regs(&k, root).ret[0], Error::NoPermission as u64, "so does its last thread");
    }
}
