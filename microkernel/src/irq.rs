//! Interrupts as IPC: an interrupt line attached to a thread sends it a message.
//!
//! The message comes from the pseudo-thread `ThreadId::irq(n)` with label
//! `label::INTERRUPT` and MR1 = n. The line is masked when it fires and stays masked
//! until the handler acknowledges (`irq_control` ACK), so one pending interrupt per line
//! is all the kernel needs to remember while the handler is not waiting.

use crate::abi::{label, Error, MsgTag, ThreadId};
use crate::kernel::{Kernel, Next};
use crate::machine::{Context, Machine};
use crate::syscalls::{IrqOp, SysResult};
use crate::thread::{Peer, Receive, State};

#[derive(Clone, Copy, Debug)]
pub struct Irq {
    /// The attached thread, or NIL.
    pub handler: ThreadId,
    /// Fired while the handler was not waiting.
    pub pending: bool,
}

impl Irq {
    pub const NONE: Self = Self { handler: ThreadId::NIL, pending: false };
}

impl<M: Machine> Kernel<M> {
    /// Interrupt line `irq` fired.
    pub fn interrupt(&mut self, irq: u16) -> Next {
        let entered = self.sched.current;
        if let Some(line) = self.irqs.get(irq as usize).copied() {
            self.machine.irq_mask(irq);
            if let Some(h) = self.live(line.handler) {
                match self.threads[h].state {
                    State::RecvBlocked(Receive { from: Peer::Any, .. }) => self.deliver_irq(h, irq),
                    State::RecvBlocked(Receive { from: Peer::Irq(n), .. }) if n == irq => {
                        self.deliver_irq(h, irq)
                    }
                    _ => {
                        self.set_pending(irq, true);
                    }
                }
            }
        }
        self.reschedule(entered)
    }

    /// Complete the receive of `x` with the message of interrupt `n`.
    pub(crate) fn deliver_irq(&mut self, x: usize, n: u16) {
        let mut mrs = self.threads[x].ctx.mrs();
        mrs[0] = MsgTag::new(label::INTERRUPT, 1, 0, 0).0;
        mrs[1] = n as u64;
        self.threads[x].ctx.set_mrs(&mrs);
        self.finish(x, Ok(ThreadId::irq(n)));
    }

    pub(crate) fn irq_attached(&self, n: u16, to: ThreadId) -> bool {
        self.irqs.get(n as usize).is_some_and(|l| l.handler == to)
    }

    /// A pending interrupt attached to `to`.
    pub(crate) fn pending_irq_of(&self, to: ThreadId) -> Option<u16> {
        if self.irqs_pending == 0 {
            return None;
        }
        self.irqs.iter().position(|l| l.pending && l.handler == to).map(|n| n as u16)
    }

    /// Clear the pending flag of line `n`; returns whether it was set.
    pub(crate) fn take_pending(&mut self, n: u16) -> bool {
        self.set_pending(n, false)
    }

    /// Set or clear the pending flag of line `n`, keeping `irqs_pending` (the number of
    /// pending lines) right; returns the old flag. Every change of a flag goes here.
    fn set_pending(&mut self, n: u16, pending: bool) -> bool {
        let Some(line) = self.irqs.get_mut(n as usize) else { return false };
        let old = core::mem::replace(&mut line.pending, pending);
        match (old, pending) {
            (false, true) => self.irqs_pending += 1,
            (true, false) => self.irqs_pending -= 1,
            _ => {}
        }
        old
    }

    /// Detach every line attached to `t`.
    pub(crate) fn detach_irqs(&mut self, t: ThreadId) {
        for n in 0..self.irqs.len() {
            if self.irqs[n].handler == t {
                self.detach(n as u16);
            }
        }
    }

    fn detach(&mut self, n: u16) {
        self.set_pending(n, false);
        let old = core::mem::replace(&mut self.irqs[n as usize], Irq::NONE);
        self.machine.irq_mask(n);
        if let Some(h) = self.live(old.handler) {
            if matches!(self.threads[h].state, State::RecvBlocked(Receive { from: Peer::Irq(m), .. }) if m == n)
            {
                self.finish(h, Err(Error::RecvNotExist));
            }
        }
    }

    /// `irq_control`: attach a line to a thread or detach it (privileged), or
    /// acknowledge it (its handler).
    pub(crate) fn sys_irq_control(
        &mut self,
        me: usize,
        op: IrqOp,
        irq: u16,
        thread: ThreadId,
    ) -> SysResult {
        let line = *self.irqs.get(irq as usize).ok_or(Error::NotExist)?;
        match op {
            IrqOp::Ack if line.handler != self.threads[me].id => Err(Error::NoPermission),
            IrqOp::Ack => {
                self.machine.irq_unmask(irq);
                Ok([0, 0])
            }
            _ if !self.privileged(me) => Err(Error::NoPermission),
            IrqOp::Attach => {
                self.live(thread).ok_or(Error::NotExist)?;
                if line.handler != thread && self.live(line.handler).is_some() {
                    return Err(Error::InUse);
                }
                self.set_pending(irq, false);
                self.irqs[irq as usize] = Irq { handler: thread, pending: false };
                self.machine.irq_unmask(irq);
                Ok([0, 0])
            }
            IrqOp::Detach => {
                self.detach(irq);
                Ok([0, 0])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::abi::{irq_control, label, Error, MsgTag, Sysno, ThreadId, Timeout};
    use crate::testing::*;
    use crate::Next;

    #[test]
    fn interrupt_delivered_as_ipc() {
        let (mut k, root) = boot();
        let driver = spawn(&mut k, root, 30, ThreadId::NIL);
        let attach = [irq_control::ATTACH, 2, driver.raw(), 0];
        assert_eq!(sys(&mut k, root, Sysno::IrqControl, attach, msg(0, &[])), switch(&k, driver));
        assert_eq!(regs(&k, root).ret[0], 0);
        assert!(!k.machine.masked.contains(&2));
        let wait = |k: &mut K| {
            ipc(k, driver, ThreadId::NIL, ThreadId::ANY, Timeout::ZERO, Timeout::NEVER, msg(0, &[]))
        };
        assert_eq!(wait(&mut k), switch(&k, root));
        // the interrupt wakes the driver, which preempts root; the line stays masked
        assert_eq!(k.interrupt(2), switch(&k, driver));
        let r = regs(&k, driver);
        assert_eq!(
            (r.ret, r.mrs[..2].to_vec()),
            (
                [0, ThreadId::irq(2).raw(), 0],
                [MsgTag::new(label::INTERRUPT, 1, 0, 0).0, 2].to_vec()
            )
        );
        assert!(k.machine.masked.contains(&2));
        let ack = [irq_control::ACK, 2, 0, 0];
        assert_eq!(sys(&mut k, driver, Sysno::IrqControl, ack, msg(0, &[])), Next::Resume);
        assert!(!k.machine.masked.contains(&2));
        // while the driver is busy the interrupt is kept pending
        assert_eq!(k.interrupt(2), Next::Resume);
        let from_irq = ipc(
            &mut k,
            driver,
            ThreadId::NIL,
            ThreadId::irq(2),
            Timeout::ZERO,
            Timeout::ZERO,
            msg(0, &[]),
        );
        assert_eq!(from_irq, Next::Resume);
        assert_eq!(regs(&k, driver).ret, [0, ThreadId::irq(2).raw(), 0]);
        // only the handler acknowledges; unattached lines are ignored
        let on_line = ipc(
            &mut k,
            driver,
            ThreadId::NIL,
            ThreadId::irq(2),
            Timeout::ZERO,
            Timeout::NEVER,
            msg(0, &[]),
        );
        assert_eq!(on_line, switch(&k, root));
        assert_eq!(sys(&mut k, root, Sysno::IrqControl, ack, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, root).ret[0], Error::NoPermission as u64);
        assert_eq!(k.interrupt(1), Next::Resume);
        assert_eq!(k.interrupt(1000), Next::Resume);
        // one handler per line; detaching wakes the driver waiting on that line
        assert_eq!(
            sys(
                &mut k,
                root,
                Sysno::IrqControl,
                [irq_control::ATTACH, 2, root.raw(), 0],
                msg(0, &[])
            ),
            Next::Resume
        );
        assert_eq!(regs(&k, root).ret[0], Error::InUse as u64);
        let detach = [irq_control::DETACH, 2, 0, 0];
        assert_eq!(sys(&mut k, root, Sysno::IrqControl, detach, msg(0, &[])), switch(&k, driver));
        assert_eq!(regs(&k, driver).ret[0], Error::RecvNotExist as u64);
        assert!(k.machine.masked.contains(&2));
        assert_eq!(k.interrupt(2), Next::Resume, "no handler any more");
    }
}
