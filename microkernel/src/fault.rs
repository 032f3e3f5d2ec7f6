//! Faults: page faults go as IPC to the thread's pager, exceptions to its supervisor.
//!
//! The kernel makes the faulting thread call its handler: the thread sends a message
//! built from the fault (see `abi::label`) and waits for the handler's reply with an
//! infinite timeout and the whole address space as its receive window. A page-fault
//! reply normally carries map items; the thread then retries the access. An exception
//! reply with two words sets ip and sp, which lets a supervisor restart the thread.
//! The thread's own registers are never touched by the fault message. Without a live
//! handler (a page fault falls back to the supervisor) the thread becomes `Faulted`
//! until `exchange_registers` resumes it.

use crate::abi::{label, Fpage, MsgTag, Rights, ThreadId, Timeout, MR_COUNT, PAGE_BITS};
use crate::kernel::{Kernel, Next};
use crate::machine::{Context, Machine};
use crate::mapdb::At;
use crate::thread::{Peer, Receive, State};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Page { addr: u64, access: Rights, ip: u64 },
    Exception { vector: u64, code: u64, ip: u64, sp: u64 },
}

impl Fault {
    /// The message the faulting thread sends.
    pub fn message(self) -> [u64; MR_COUNT] {
        let mut m = [0; MR_COUNT];
        match self {
            Fault::Page { addr, access, ip } => {
                m[..3].copy_from_slice(&[
                    MsgTag::new(label::PAGE_FAULT, 2, 0, access.bits() as u64).0,
                    addr,
                    ip,
                ]);
            }
            Fault::Exception { vector, code, ip, sp } => {
                m[..5].copy_from_slice(&[
                    MsgTag::new(label::EXCEPTION, 4, 0, 0).0,
                    vector,
                    code,
                    ip,
                    sp,
                ]);
            }
        }
        m
    }
}

impl<M: Machine> Kernel<M> {
    /// The running thread faulted on user address `addr` wanting `access`.
    pub fn page_fault(&mut self, addr: u64, access: Rights) -> Next {
        let Some(me) = self.sched.current else {
            return self.reschedule(None);
        };
        let want = if access.is_empty() { Rights::R } else { access };
        let at = At { task: self.task_id(me), vpn: addr >> PAGE_BITS };
        if self.mapdb.lookup(at).is_some_and(|(_, have)| have.contains(want)) {
            // Already resolved (e.g. a stale TLB entry): just retry.
            return self.reschedule(Some(me));
        }
        let ip = self.threads[me].ctx.ip();
        let pager = self.threads[me].pager;
        let handler = match self.live(pager) {
            Some(p) if p != me => pager,
            _ => self.threads[me].supervisor,
        };
        self.raise(me, Fault::Page { addr, access: want, ip }, handler);
        self.reschedule(Some(me))
    }

    /// The running thread raised CPU exception `vector` with error `code`.
    pub fn exception(&mut self, vector: u64, code: u64) -> Next {
        let Some(me) = self.sched.current else {
            return self.reschedule(None);
        };
        let ctx = &self.threads[me].ctx;
        let fault = Fault::Exception { vector, code, ip: ctx.ip(), sp: ctx.sp() };
        self.raise(me, fault, self.threads[me].supervisor);
        self.reschedule(Some(me))
    }

    fn raise(&mut self, me: usize, fault: Fault, handler: ThreadId) {
        self.threads[me].fault = Some(fault);
        if self.live(handler).is_none_or(|h| h == me) {
            self.make_blocked(me, State::Faulted);
            return;
        }
        let reply = Receive {
            from: Peer::Thread(handler),
            window: Fpage::complete(Rights::ALL),
            timeout: Timeout::NEVER,
        };
        if let Some(partner) = self.send(me, handler, Some(reply), Timeout::NEVER) {
            self.direct_switch(partner);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::abi::{exregs, label, Fpage, MapItem, MsgTag, Rights, Sysno, ThreadId, MR_COUNT};
    use crate::mapdb::At;
    use crate::testing::*;
    use crate::thread::State;
    use crate::Next;

    fn state(k: &K, t: ThreadId) -> State {
        k.threads[k.live(t).unwrap()].state
    }

    #[test]
    fn page_fault_goes_to_the_pager() {
        let (mut k, root) = boot();
        // a pager thread in the root task (which owns the memory)
        let pager = spawn(&mut k, root, 30, NIL);
        let t = spawn_task(&mut k, 20, pager);
        assert_eq!(settle(&mut k), Some(pager));
        assert_eq!(ipc(&mut k, pager, NIL, ANY, ZERO, NEVER, msg(0, &[])), switch(&k, t));
        let before =
            Regs { ip: 0x40_1234, sp: 0x7000, mrs: [5; MR_COUNT], ret: [6; 3], ..Regs::default() };
        *k.context_mut(t).unwrap() = before.clone();
        // the write fault becomes a message from t, and the pager runs at once
        assert_eq!(k.page_fault(0x40_1234, Rights::W), switch(&k, pager));
        k.check();
        let r = regs(&k, pager);
        assert_eq!(r.ret, [0, t.raw(), 0]);
        assert_eq!(
            r.mrs[..3],
            [MsgTag::new(label::PAGE_FAULT, 2, 0, Rights::W.bits() as u64).0, 0x40_1234, 0x40_1234]
        );
        // the pager replies with a mapping; the hotspot places it at the fault address
        let mut reply = [0; MR_COUNT];
        reply[0] = MsgTag::new(0, 0, 2, 0).0;
        let fpage = Fpage::new(0x10_3000, 12, Rights::RW).unwrap();
        reply[1..3].copy_from_slice(&MapItem { grant: false, hotspot: 0x40_1234, fpage }.raw());
        assert_eq!(ipc(&mut k, pager, t, ANY, ZERO, NEVER, reply), switch(&k, t));
        assert_eq!(
            k.mapdb.lookup(At { task: k.task_of(t).unwrap(), vpn: 0x401 }),
            Some((0x103, Rights::RW))
        );
        assert_eq!(state(&k, t), State::Ready);
        assert_eq!(regs(&k, t), before, "the fault IPC left the thread's registers alone");
        // the access now succeeds: a repeated fault is spurious and just resumes
        assert_eq!(k.page_fault(0x40_1234, Rights::W), Next::Resume);
        assert_eq!(k.page_fault(0x40_1000, Rights::X), switch(&k, pager), "no execute right");
    }

    #[test]
    fn pager_not_waiting_yet() {
        let (mut k, root) = boot();
        let t = spawn_task(&mut k, 20, root);
        assert_eq!(settle(&mut k), Some(t));
        assert_eq!(k.page_fault(0x5000, Rights::R), switch(&k, root));
        assert_eq!(ipc(&mut k, root, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, root).mrs[1], 0x5000);
        // an empty reply resumes the thread, which will fault again
        assert_eq!(ipc(&mut k, root, t, NIL, ZERO, ZERO, msg(0, &[])), switch(&k, t));
        assert_eq!(k.page_fault(0x5000, Rights::R), switch(&k, root));
    }

    #[test]
    fn exception_to_supervisor_restarts() {
        let (mut k, root) = boot();
        let sup = spawn(&mut k, root, 30, NIL);
        let t = spawn_task(&mut k, 20, root);
        tcb(&mut k, t).supervisor = sup;
        assert_eq!(settle(&mut k), Some(sup));
        assert_eq!(ipc(&mut k, sup, NIL, ANY, ZERO, NEVER, msg(0, &[])), switch(&k, t));
        k.context_mut(t).unwrap().ip = 0xdead;
        k.context_mut(t).unwrap().sp = 0xbeef;
        assert_eq!(k.exception(13, 0x18), switch(&k, sup));
        let r = regs(&k, sup);
        assert_eq!(
            (r.ret[1], r.mrs[..5].to_vec()),
            (
                t.raw(),
                [MsgTag::new(label::EXCEPTION, 4, 0, 0).0, 13, 0x18, 0xdead, 0xbeef].to_vec()
            )
        );
        // the supervisor restarts the thread at a new ip and sp
        assert_eq!(ipc(&mut k, sup, t, ANY, ZERO, NEVER, msg(0, &[0x1000, 0x9000])), switch(&k, t));
        assert_eq!((regs(&k, t).ip, regs(&k, t).sp), (0x1000, 0x9000));
        assert_eq!(state(&k, t), State::Ready);
    }

    #[test]
    fn no_handler_means_faulted_until_resumed() {
        let (mut k, root) = boot();
        let t = spawn_task(&mut k, 20, NIL);
        tcb(&mut k, t).supervisor = NIL;
        (k.context_mut(t).unwrap().ip, k.context_mut(t).unwrap().sp) = (0x2222, 0x3333);
        assert_eq!(settle(&mut k), Some(t));
        assert_eq!(k.page_fault(0x5000, Rights::R), switch(&k, root));
        assert_eq!(state(&k, t), State::Faulted);
        // the handler dying during fault IPC also leaves the thread faulted
        let u = spawn_task(&mut k, 20, NIL);
        let helper = spawn(&mut k, root, 5, NIL);
        tcb(&mut k, u).supervisor = helper;
        assert_eq!(settle(&mut k), Some(u));
        assert_eq!(k.exception(6, 0), switch(&k, root));
        assert!(matches!(state(&k, u), State::SendBlocked { .. }));
        let delete = [crate::abi::thread_control::DELETE, helper.raw(), 0, 0];
        assert_eq!(sys(&mut k, root, Sysno::ThreadControl, delete, msg(0, &[])), Next::Resume);
        assert_eq!(state(&k, u), State::Faulted);
        // exchange_registers resumes a faulted thread elsewhere
        let args = [t.raw(), exregs::RESUME | exregs::SET_IP, 0x3000, 0];
        assert_eq!(sys(&mut k, root, Sysno::ExchangeRegisters, args, msg(0, &[])), switch(&k, t));
        assert_eq!((state(&k, t), regs(&k, t).ip), (State::Ready, 0x3000));
        assert_eq!(regs(&k, root).ret, [0, 0x2222, 0x3333], "old ip and sp");
    }
}
