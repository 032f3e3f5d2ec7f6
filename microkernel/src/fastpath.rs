//! The IPC fast path: `call` and `reply_wait` carrying only untyped words, to a partner
//! that is already waiting, handing it the CPU at once.
//!
//! This is seL4's idea: the common case of a client/server round trip gets a short,
//! straight-line path that checks every condition up front and otherwise changes
//! nothing, so the arch layer falls back to the full `syscall` path. When it fires, the
//! resulting state is exactly what the full path produces (the differential test
//! below checks that): the message words are in the partner's registers with its
//! result `[0, sender]`, the partner is the running thread, and the caller waits in its
//! receive phase (from the partner for `call`, from anyone for `reply_wait`).
//!
//! Conditions: an `ipc` with a nil receive window and an infinite receive timeout;
//! `call` (from = to) or `reply_wait` (from = ANY, and no sender or interrupt already
//! waiting for the caller); a valid tag with no typed words; the partner live, not
//! the caller, receiving from the caller or from anyone, not in fault IPC, with no
//! timeout armed; and no ready thread above the partner's priority.

use crate::abi::{Fpage, IdKind, MsgTag, Sysno, ThreadId, Timeout};
use crate::kernel::{Kernel, Next};
use crate::machine::{Context, Machine};
use crate::thread::{Peer, Receive, State};

impl<M: Machine> Kernel<M> {
    /// The running thread's system call, if the fast path can do it; `None` (nothing
    /// changed): use [`Kernel::syscall`].
    pub fn fastpath(&mut self) -> Option<Next> {
        let me = self.sched.current?;
        let (nr, a) = self.threads[me].ctx.syscall();
        if nr != Sysno::Ipc as u64 || a[3] != Fpage::NIL.raw() {
            return None;
        }
        let (to, from) = (ThreadId::from_raw(a[0])?, ThreadId::from_raw(a[1])?);
        let call = from == to;
        let (_, recv_timeout) = Timeout::split(a[2]);
        if !(call || from == ThreadId::ANY)
            || recv_timeout != Timeout::NEVER
            || !matches!(to.kind(), IdKind::Thread { .. })
        {
            return None;
        }
        let me_id = self.threads[me].id;
        let r = self.live(to).filter(|&r| r != me)?;
        let waits_for_me = match self.threads[r].state {
            State::RecvBlocked(Receive { from: Peer::Any, .. }) => true,
            State::RecvBlocked(Receive { from: Peer::Thread(t), .. }) => t == me_id,
            _ => false,
        };
        let mut mrs = self.threads[me].ctx.mrs();
        let tag = MsgTag(mrs[0]);
        if !waits_for_me
            || self.threads[r].fault.is_some()
            || self.threads[r].deadline.is_some()
            || !tag.is_valid()
            || tag.typed() != 0
            || self.sched.highest() > Some(self.threads[r].prio)
            || (!call
                && (!self.threads[me].senders.is_empty() || self.pending_irq_of(me_id).is_some()))
        {
            return None;
        }
        // Commit: transfer, wake the partner, block the caller, switch.
        let len = 1 + tag.untyped();
        let mut theirs = self.threads[r].ctx.mrs();
        theirs[..len].copy_from_slice(&mrs[..len]);
        mrs = theirs;
        self.threads[r].ctx.set_mrs(&mrs);
        self.threads[r].ctx.set_ret([0, me_id.raw(), 0]);
        self.threads[r].state = State::Ready;
        let peer = if call { Peer::Thread(to) } else { Peer::Any };
        let recv = Receive { from: peer, window: Fpage::NIL, timeout: Timeout::NEVER };
        self.threads[me].state = State::RecvBlocked(recv);
        self.sched.current = Some(r);
        Some(Next::Switch { thread: to, task: self.task_id(r) })
    }
}

#[cfg(test)]
mod tests {
    use crate::abi::{Fpage, MapItem, MsgTag, Rights, Sysno, ThreadId, Timeout, MR_COUNT};
    use crate::testing::*;
    use crate::Next;

    /// The same small system twice: root, a server and two clients in their own
    /// tasks at the root's priority, a higher-priority thread, and one more thread.
    fn system() -> (K, [ThreadId; 6]) {
        let (mut k, root) = boot();
        let s = spawn_task(&mut k, 10, root);
        let c1 = spawn_task(&mut k, 10, root);
        let c2 = spawn_task(&mut k, 10, root);
        let h = spawn_task(&mut k, 12, root);
        let x = spawn(&mut k, c1, 10, root);
        // The high-priority thread waits for anyone: a message to it preempts.
        assert_eq!(settle(&mut k), Some(h));
        ipc(&mut k, h, ThreadId::NIL, ThreadId::ANY, Timeout::NEVER, Timeout::NEVER, msg(0, &[]));
        settle(&mut k);
        (k, [root, s, c1, c2, h, x])
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<T: Copy>(&mut self, s: &[T]) -> T {
            s[(self.next() % s.len() as u64) as usize]
        }
    }

    /// Everything observable about the threads of `k`.
    fn snapshot(k: &K) -> std::vec::Vec<std::string::String> {
        k.threads
            .iter()
            .map(|t| {
                std::format!(
                    "{:?} {:?} {:?} {:?} {} {:?}",
                    t.id,
                    t.state,
                    t.ctx,
                    t.deadline,
                    t.remaining,
                    t.fault
                )
            })
            .collect()
    }

    /// Random system calls on two copies of the same system, one through the fast path
    /// first: after every step both must agree on everything.
    #[test]
    fn fast_path_is_the_full_path() {
        let mut fired = 0;
        for seed in 1..=300u64 {
            let (mut a, ids) = system();
            let (mut b, _) = system();
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            for step in 0..400 {
                let Some(me) = a.current() else {
                    assert_eq!(a.tick(), b.tick());
                    continue;
                };
                let to = rng.pick(&ids);
                let never = Timeout::pair(Timeout::NEVER, Timeout::NEVER);
                let rw = Timeout::pair(Timeout::ZERO, Timeout::NEVER);
                let short = Timeout::pair(Timeout(2), Timeout(3));
                let nil = Fpage::NIL.raw();
                let window = Fpage::new(0x40_0000, 22, Rights::ALL).unwrap().raw();
                let any = ThreadId::ANY.raw();
                // Reply to whoever sent last, as a server does.
                let last = ThreadId(a.context(me).unwrap().ret[1] as u32);
                let client = if last.0 != 0 && last.0 != u32::MAX && !rng.next().is_multiple_of(4) {
                    last
                } else {
                    to
                };
                let (args, tick) = match rng.next() % 10 {
                    0..=2 => ([to.raw(), to.raw(), never, nil], false),
                    3..=5 => ([client.raw(), any, rw, nil], false),
                    6 => (
                        [to.raw(), any, rng.pick(&[never, short, rw]), rng.pick(&[nil, window])],
                        false,
                    ),
                    7 => ([0, rng.pick(&[any, to.raw()]), rng.pick(&[never, short]), nil], false),
                    8 => ([to.raw(), to.raw(), never, nil], true),
                    _ => ([rng.pick(&[to.raw(), 0]), 0, short, nil], false),
                };
                let mut mrs = [0u64; MR_COUNT];
                for m in mrs.iter_mut() {
                    *m = rng.next();
                }
                let untyped = rng.next() % 8;
                mrs[0] = MsgTag::new(step, untyped, 0, 0).0;
                if rng.next().is_multiple_of(8) {
                    mrs[0] = MsgTag::new(step, 1, 2, 0).0;
                    let f = Fpage::new(0x100 << 12, 12, Rights::R).unwrap();
                    mrs[2..4]
                        .copy_from_slice(&MapItem { grant: false, hotspot: 0, fpage: f }.raw());
                }
                for k in [&mut a, &mut b] {
                    let regs = k.context_mut(me).unwrap();
                    regs.nr = Sysno::Ipc as u64;
                    regs.args = args;
                    regs.mrs = mrs;
                }
                let na = a.syscall();
                let nb = match b.fastpath() {
                    Some(n) => {
                        fired += 1;
                        n
                    }
                    None => b.syscall(),
                };
                assert_eq!(na, nb, "seed {seed} step {step}");
                assert_eq!(snapshot(&a), snapshot(&b), "seed {seed} step {step}");
                a.check();
                b.check();
                if tick {
                    assert_eq!(a.tick(), b.tick());
                }
            }
        }
        assert!(fired > 400, "the fast path fired only {fired} times");
        std::println!("fast path fired {fired} times");
    }

    #[test]
    fn call_and_reply_wait_take_the_fast_path() {
        let (mut k, root) = boot();
        let s = spawn_task(&mut k, 10, root);
        let c = spawn_task(&mut k, 10, root);
        // The server waits (full path), then the client calls it (fast path).
        ipc(
            &mut k,
            root,
            ThreadId::NIL,
            ThreadId::NIL,
            Timeout::NEVER,
            Timeout::NEVER,
            msg(0, &[]),
        );
        k.reschedule(None);
        while k.current() != Some(s) {
            k.tick();
        }
        let rw = Timeout::pair(Timeout::ZERO, Timeout::NEVER);
        let regs = k.context_mut(s).unwrap();
        (regs.nr, regs.args) = (Sysno::Ipc as u64, [0, ThreadId::ANY.raw(), rw, 0]);
        assert_eq!(k.fastpath(), None, "nobody to send to: full path");
        k.syscall();
        while k.current() != Some(c) {
            k.tick();
        }
        let never = Timeout::pair(Timeout::NEVER, Timeout::NEVER);
        let regs = k.context_mut(c).unwrap();
        (regs.nr, regs.args, regs.mrs) =
            (Sysno::Ipc as u64, [s.raw(), s.raw(), never, 0], msg(7, &[1, 2, 3]));
        assert_eq!(k.fastpath(), Some(Next::Switch { thread: s, task: k.task_of(s).unwrap() }));
        k.check();
        assert_eq!(regs_of(&k, s), (msg(7, &[1, 2, 3]), [0, c.raw(), 0]));
        // The server replies and waits: fast path back to the client.
        let regs = k.context_mut(s).unwrap();
        (regs.nr, regs.args, regs.mrs) =
            (Sysno::Ipc as u64, [c.raw(), ThreadId::ANY.raw(), rw, 0], msg(8, &[4]));
        assert_eq!(k.fastpath(), Some(Next::Switch { thread: c, task: k.task_of(c).unwrap() }));
        k.check();
        assert_eq!(regs_of(&k, c).1, [0, s.raw(), 0]);
        assert_eq!(regs_of(&k, c).0[..2], msg(8, &[4])[..2]);
    }

    fn regs_of(k: &K, t: ThreadId) -> ([u64; MR_COUNT], [u64; 3]) {
        let r = regs(k, t);
        (r.mrs, r.ret)
    }
}
