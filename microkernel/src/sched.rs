//! The scheduler: fixed-priority round robin with time slices, and IPC timeouts.
//!
//! Rules:
//! - 256 priorities, higher runs first; equal priorities share the CPU round robin, one
//!   time slice each. The running thread is `current` and is in no queue.
//! - The running thread always has the highest priority of all ready threads: whoever
//!   becomes ready with a higher one preempts it at the end of the kernel entry (the
//!   preempted thread goes to the front of its queue, keeping the rest of its slice).
//! - An expired slice sends the thread to the back of its queue with a fresh slice.
//! - IPC may hand the CPU straight to the partner it woke (`direct_switch`) when the
//!   caller blocked and the partner's priority is the highest ready one; no queue is
//!   consulted. This is L4's direct process switch.
//! - Timeouts are absolute tick numbers in an ordered set; each tick wakes the expired.

use alloc::collections::BTreeSet;

use crate::abi::{Error, ThreadId, Timeout};
use crate::kernel::{Kernel, Next};
use crate::list::{Links, Queue};
use crate::machine::Machine;
use crate::syscalls::SysResult;
use crate::thread::State;

const PRIORITIES: usize = 256;

pub struct Sched {
    queues: [Queue; PRIORITIES],
    links: Links,
    /// Bit `p` is set when `queues[p]` is not empty.
    nonempty: [u64; PRIORITIES / 64],
    /// The running thread.
    pub current: Option<usize>,
    timeouts: BTreeSet<(u64, usize)>,
    /// Timer ticks since boot.
    pub now: u64,
}

impl Sched {
    pub fn new(threads: usize) -> Self {
        Self {
            queues: [Queue::EMPTY; PRIORITIES],
            links: Links::new(threads),
            nonempty: [0; PRIORITIES / 64],
            current: None,
            timeouts: BTreeSet::new(),
            now: 0,
        }
    }

    pub fn is_queued(&self, i: usize) -> bool {
        self.links.is_linked(i)
    }

    fn enqueue(&mut self, i: usize, prio: u8, front: bool) {
        let p = prio as usize;
        if front {
            self.links.push_front(&mut self.queues[p], i);
        } else {
            self.links.push_back(&mut self.queues[p], i);
        }
        self.nonempty[p / 64] |= 1 << (p % 64);
    }

    fn dequeue(&mut self, i: usize, prio: u8) {
        let p = prio as usize;
        self.links.remove(&mut self.queues[p], i);
        if self.queues[p].is_empty() {
            self.nonempty[p / 64] &= !(1 << (p % 64));
        }
    }

    /// The highest priority with a queued thread.
    pub(crate) fn highest(&self) -> Option<u8> {
        let w = (0..self.nonempty.len()).rev().find(|&w| self.nonempty[w] != 0)?;
        Some((w * 64 + 63 - self.nonempty[w].leading_zeros() as usize) as u8)
    }

    fn pop_highest(&mut self) -> Option<usize> {
        let p = self.highest()?;
        let i = self.queues[p as usize].front()?;
        self.dequeue(i, p);
        Some(i)
    }

    #[cfg(any(test, feature = "invariants"))]
    pub fn armed(&self, i: usize, deadline: Option<u64>) -> bool {
        deadline.is_some_and(|d| self.timeouts.contains(&(d, i)))
    }
}

impl<M: Machine> Kernel<M> {
    /// Make thread `i` runnable (no effect on a ready thread).
    pub(crate) fn make_ready(&mut self, i: usize) {
        self.threads[i].state = State::Ready;
        if self.sched.current != Some(i) && !self.sched.is_queued(i) {
            self.sched.enqueue(i, self.threads[i].prio, false);
        }
    }

    /// Put thread `i` into a state other than ready.
    pub(crate) fn make_blocked(&mut self, i: usize, state: State) {
        debug_assert!(state != State::Ready);
        self.sched.dequeue(i, self.threads[i].prio);
        self.threads[i].state = state;
    }

    pub(crate) fn set_deadline(&mut self, i: usize, timeout: Timeout) {
        self.clear_deadline(i);
        if timeout != Timeout::NEVER {
            let at = self.sched.now.saturating_add(timeout.0 as u64);
            self.threads[i].deadline = Some(at);
            self.sched.timeouts.insert((at, i));
        }
    }

    pub(crate) fn clear_deadline(&mut self, i: usize) {
        if let Some(at) = self.threads[i].deadline.take() {
            self.sched.timeouts.remove(&(at, i));
        }
    }

    /// Run `to` right away if the running thread blocked and nothing ready outranks `to`.
    pub(crate) fn direct_switch(&mut self, to: usize) {
        let caller_runs = self.sched.current.is_some_and(|c| self.threads[c].state == State::Ready);
        let prio = self.threads[to].prio;
        if caller_runs || !self.sched.is_queued(to) || self.sched.highest() > Some(prio) {
            return;
        }
        self.sched.dequeue(to, prio);
        self.sched.current = Some(to);
    }

    /// Choose the thread to run after a kernel entry by `entered` (`None`: from idle).
    pub(crate) fn reschedule(&mut self, entered: Option<usize>) -> Next {
        let mut run = self.sched.current.filter(|&c| self.threads[c].state == State::Ready);
        if let Some(c) = run {
            if self.sched.highest() > Some(self.threads[c].prio) {
                self.sched.enqueue(c, self.threads[c].prio, true);
                run = None;
            }
        }
        if run.is_none() {
            run = self.sched.pop_highest();
        }
        self.sched.current = run;
        match run {
            None => Next::Idle,
            Some(c) if Some(c) == entered => Next::Resume,
            Some(c) => Next::Switch { thread: self.threads[c].id, task: self.task_id(c) },
        }
    }

    /// Timer interrupt: wake expired timeouts, charge the running thread a tick.
    pub fn tick(&mut self) -> Next {
        let entered = self.sched.current;
        self.sched.now = self.sched.now.saturating_add(1);
        while let Some(&(at, i)) = self.sched.timeouts.first() {
            if at > self.sched.now {
                break;
            }
            match self.threads[i].state {
                State::SendBlocked { .. } => self.finish(i, Err(Error::SendTimeout)),
                _ => self.finish(i, Err(Error::RecvTimeout)),
            }
        }
        if let Some(c) = entered {
            let t = &mut self.threads[c];
            t.remaining = t.remaining.saturating_sub(1);
            if t.remaining == 0 {
                self.rotate(c);
            }
        }
        self.reschedule(entered)
    }

    /// Send the running thread `c` to the back of its queue with a fresh slice.
    fn rotate(&mut self, c: usize) {
        self.threads[c].remaining = self.threads[c].timeslice;
        self.sched.enqueue(c, self.threads[c].prio, false);
        self.sched.current = None;
    }

    /// `thread_switch`: give the CPU to `to` if it is ready, else to whoever is next.
    pub(crate) fn sys_thread_switch(&mut self, me: usize, to: ThreadId) -> SysResult {
        let target = match to {
            ThreadId::NIL => None,
            _ => Some(self.live(to).ok_or(Error::NotExist)?),
        };
        self.rotate(me);
        if let Some(t) = target.filter(|&t| self.sched.is_queued(t)) {
            self.sched.dequeue(t, self.threads[t].prio);
            self.sched.current = Some(t);
        }
        Ok([0, 0])
    }

    /// `schedule`: set priority and time slice of `dest`. A privileged caller may set
    /// anything; others only for threads of their own task, up to their own priority.
    pub(crate) fn sys_schedule(
        &mut self,
        me: usize,
        dest: ThreadId,
        prio: Option<u8>,
        timeslice: Option<u32>,
    ) -> SysResult {
        let d = self.live(dest).ok_or(Error::NotExist)?;
        let allowed = self.privileged(me)
            || (self.threads[d].task == self.threads[me].task
                && prio.is_none_or(|p| p <= self.threads[me].prio));
        if !allowed {
            return Err(Error::NoPermission);
        }
        let old = [self.threads[d].prio as u64, self.threads[d].timeslice as u64];
        if let Some(p) = prio {
            let queued = self.sched.is_queued(d);
            self.sched.dequeue(d, self.threads[d].prio);
            self.threads[d].prio = p;
            if queued {
                self.sched.enqueue(d, p, false);
            }
        }
        if let Some(slice) = timeslice {
            self.threads[d].timeslice = slice;
            self.threads[d].remaining = self.threads[d].remaining.min(slice);
        }
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    use crate::abi::{Error, Sysno, ThreadId, Timeout, NO_CHANGE};
    use crate::testing::*;
    use crate::Next;

    #[test]
    fn time_slices_preempt_a_spinning_thread() {
        let (mut k, root) = boot();
        let a = spawn(&mut k, root, 20, NIL);
        let b = spawn(&mut k, root, 20, NIL);
        assert_eq!(settle(&mut k), Some(a));
        for (t, other) in [(a, b), (b, a), (a, b)] {
            assert_eq!(k.current(), Some(t));
            assert_eq!(k.tick(), Next::Resume);
            assert_eq!(k.tick(), Next::Resume);
            assert_eq!(k.tick(), switch(&k, other), "slice of 3 ticks used up");
            k.check();
        }
    }

    #[test]
    fn higher_priority_preempts_and_the_preempted_keeps_its_place() {
        let (mut k, root) = boot();
        let a = spawn(&mut k, root, 20, NIL);
        let b = spawn(&mut k, root, 20, NIL);
        let high = spawn(&mut k, root, 30, NIL);
        assert_eq!(settle(&mut k), Some(high));
        assert_eq!(
            ipc(&mut k, high, NIL, ThreadId::ANY, Timeout::ZERO, Timeout(1), msg(0, &[])),
            switch(&k, a)
        );
        assert_eq!(k.tick(), switch(&k, high), "timeout wakes the higher priority thread");
        assert_eq!(
            ipc(&mut k, high, NIL, ThreadId::ANY, Timeout::ZERO, Timeout::NEVER, msg(0, &[])),
            switch(&k, a)
        );
        assert_eq!(k.tick(), Next::Resume);
        assert_eq!(k.tick(), switch(&k, b), "a kept the rest of its slice, not more");
    }

    #[test]
    fn yield_and_donate() {
        let (mut k, root) = boot();
        let a = spawn(&mut k, root, 20, NIL);
        let b = spawn(&mut k, root, 20, NIL);
        let c = spawn(&mut k, root, 20, NIL);
        assert_eq!(settle(&mut k), Some(a));
        assert_eq!(sys(&mut k, a, Sysno::ThreadSwitch, [0; 4], msg(0, &[])), switch(&k, b));
        assert_eq!(
            sys(&mut k, b, Sysno::ThreadSwitch, [c.raw(), 0, 0, 0], msg(0, &[])),
            switch(&k, c)
        );
        assert_eq!(
            sys(&mut k, c, Sysno::ThreadSwitch, [b.raw(), 0, 0, 0], msg(0, &[])),
            switch(&k, b)
        );
        assert_eq!(
            sys(&mut k, b, Sysno::ThreadSwitch, [root.raw(), 0, 0, 0], msg(0, &[])),
            switch(&k, a),
            "root is outranked"
        );
        assert_eq!(
            sys(&mut k, a, Sysno::ThreadSwitch, [ThreadId::new(7, 9).raw(), 0, 0, 0], msg(0, &[])),
            Next::Resume
        );
        assert_eq!(regs(&k, a).ret[0], Error::NotExist as u64);
    }

    #[test]
    fn schedule_permissions() {
        let (mut k, root) = boot();
        let a = spawn_task(&mut k, 20, root);
        let b = spawn_task(&mut k, 20, root);
        assert_eq!(settle(&mut k), Some(a));
        let set = |t: ThreadId, prio: u64| [t.raw(), prio, NO_CHANGE, 0];
        assert_eq!(sys(&mut k, a, Sysno::Schedule, set(a, 25), msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, a).ret[0], Error::NoPermission as u64, "not above its own priority");
        assert_eq!(sys(&mut k, a, Sysno::Schedule, set(b, 5), msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, a).ret[0], Error::NoPermission as u64, "not another task's thread");
        assert_eq!(sys(&mut k, a, Sysno::Schedule, set(a, 15), msg(0, &[])), switch(&k, b));
        assert_eq!(regs(&k, a).ret, [0, 20, 3]);
        assert_eq!(
            sys(&mut k, b, Sysno::Schedule, [b.raw(), 300, NO_CHANGE, 0], msg(0, &[])),
            Next::Resume
        );
        assert_eq!(regs(&k, b).ret[0], Error::InvalidArgument as u64);
        assert_eq!(
            sys(&mut k, b, Sysno::Schedule, [b.raw(), NO_CHANGE, 0, 0], msg(0, &[])),
            Next::Resume
        );
        assert_eq!(regs(&k, b).ret[0], Error::InvalidArgument as u64, "empty time slice");
    }

    #[test]
    fn idle_until_something_happens() {
        let (mut k, root) = boot();
        let wait = ipc(&mut k, root, NIL, ThreadId::ANY, Timeout::ZERO, Timeout(2), msg(0, &[]));
        assert_eq!(wait, Next::Idle);
        assert_eq!(k.tick(), Next::Idle);
        assert_eq!(k.tick(), switch(&k, root));
        assert_eq!(regs(&k, root).ret[0], Error::RecvTimeout as u64);
    }
}
