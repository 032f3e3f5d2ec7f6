//! Messages and the IPC forms (see the table in `microkernel/SYSCALLS.md`).

use microkernel::abi::{Fpage, MapItem, MsgTag, Rights, ThreadId, Timeout, MR_COUNT};

use crate::sys::{self, Mrs};

/// A message: MR0 is the tag, MR1.. the words (untyped first, then map items).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Msg {
    pub mr: Mrs,
}

impl Msg {
    /// A message with `label` and untyped `words` (at most 7).
    pub fn new(label: u64, words: &[u64]) -> Self {
        let mut mr = [0; MR_COUNT];
        let n = words.len().min(MR_COUNT - 1);
        mr[0] = MsgTag::new(label, n as u64, 0, 0).0;
        mr[1..1 + n].copy_from_slice(&words[..n]);
        Self { mr }
    }

    /// A message carrying one map (or grant) item of `fpage`, placed at `hotspot`.
    pub fn map(label: u64, fpage: Fpage, hotspot: u64, grant: bool) -> Self {
        let [w0, w1] = MapItem { grant, hotspot, fpage }.raw();
        let mut mr = [0; MR_COUNT];
        mr[0] = MsgTag::new(label, 0, 2, 0).0;
        mr[1] = w0;
        mr[2] = w1;
        Self { mr }
    }

    pub fn tag(&self) -> MsgTag {
        MsgTag(self.mr[0])
    }
    pub fn label(&self) -> u64 {
        self.tag().label()
    }
    pub fn word(&self, i: usize) -> u64 {
        self.mr[1 + i]
    }
}

pub const NO_WINDOW: Fpage = Fpage::NIL;

/// A one-page receive window at `addr`.
pub fn window(addr: u64) -> Fpage {
    Fpage::new(addr, 12, Rights::ALL).expect("page-aligned window")
}

/// Send to `to` and wait for its reply (both timeouts infinite).
pub fn call(to: ThreadId, m: &mut Msg) -> Result<(), u64> {
    let t = Timeout::pair(Timeout::NEVER, Timeout::NEVER);
    sys::ipc(to, to, t, NO_WINDOW, &mut m.mr).map(|_| ())
}

/// Reply to `to` (if it waits) and wait for the next message from anyone.
pub fn reply_wait(to: ThreadId, m: &mut Msg) -> Result<ThreadId, u64> {
    let t = Timeout::pair(Timeout::ZERO, Timeout::NEVER);
    sys::ipc(to, ThreadId::ANY, t, NO_WINDOW, &mut m.mr)
}

pub fn send(to: ThreadId, m: &mut Msg, timeout: Timeout) -> Result<(), u64> {
    let t = Timeout::pair(timeout, Timeout::NEVER);
    sys::ipc(to, ThreadId::NIL, t, NO_WINDOW, &mut m.mr).map(|_| ())
}

/// Receive from `from` (a thread, `ANY`, or an interrupt) into `window`.
pub fn receive(from: ThreadId, timeout: Timeout, window: Fpage) -> Result<(ThreadId, Msg), u64> {
    let mut m = Msg::default();
    let t = Timeout::pair(Timeout::ZERO, timeout);
    let who = sys::ipc(ThreadId::NIL, from, t, window, &mut m.mr)?;
    Ok((who, m))
}

/// Wait for a message from anyone, forever.
pub fn wait() -> (ThreadId, Msg) {
    loop {
        if let Ok(r) = receive(ThreadId::ANY, Timeout::NEVER, NO_WINDOW) {
            return r;
        }
    }
}
