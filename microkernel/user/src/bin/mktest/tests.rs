//! The test tasks and the driver that runs them: one line `PASS name` or
//! `FAIL name: reason` per test; the exit status is 0 exactly when all pass.

use core::hint::black_box;
use core::sync::atomic::Ordering;

use mkrt::abi::{irq_control, label, Error, Fpage, Rights, ThreadId, Timeout};
use mkrt::msg::{call, receive, reply_wait, send, wait, window, Msg, NO_WINDOW};
use mkrt::{lang, port, println, sys};

use crate::{booted, pager, park, report, Root, CHILD_STACK_TOP, POOL, REPORT};

pub type Outcome = Result<(), &'static str>;
type Test = fn(&Root, &mut Tasks) -> Outcome;

/// Every test: name and driver.
pub const TESTS: &[(&str, Test)] = &[
    ("ipc_call_reply", ipc_call_reply),
    ("ipc_timeouts", ipc_timeouts),
    ("ipc_server_two_clients", server_two_clients),
    ("map_unmap_recursive", map_unmap_recursive),
    ("grant", grant),
    ("pager_lazy_alloc", pager_lazy_alloc),
    ("irq_as_ipc", irq_as_ipc),
    ("preemption", preemption),
    ("fault_restart", fault_restart),
    ("guest_exits_as_ipc", crate::guest::selftest),
];

/// The tasks a test started; deleted when it ends, pass or fail.
pub struct Tasks {
    ids: [ThreadId; 8],
    n: usize,
}

impl Default for Tasks {
    fn default() -> Self {
        Self { ids: [ThreadId::NIL; 8], n: 0 }
    }
}

impl Tasks {
    fn spawn(
        &mut self,
        root: &Root,
        entry: extern "C" fn() -> !,
    ) -> Result<ThreadId, &'static str> {
        self.spawn_with(root, entry, 0)
    }

    pub fn spawn_with(
        &mut self,
        root: &Root,
        entry: extern "C" fn() -> !,
        flags: u64,
    ) -> Result<ThreadId, &'static str> {
        let t = root.spawn(entry, flags).map_err(|_| "task_new failed")?;
        self.add(t);
        Ok(t)
    }

    /// Delete every task the test started.
    pub fn kill_all(&self, root: &Root) {
        for &t in &self.ids[..self.n] {
            root.kill(t);
        }
    }

    /// Delete `t`'s task when the test ends.
    pub fn add(&mut self, t: ThreadId) {
        if self.n < self.ids.len() {
            self.ids[self.n] = t;
            self.n += 1;
        }
    }
}

pub fn run_all(root: &Root) -> u8 {
    let mut failed = 0;
    for (name, test) in TESTS {
        let mut tasks = Tasks::default();
        let outcome = test(root, &mut tasks);
        tasks.kill_all(root);
        match outcome {
            Ok(()) => println!("PASS {name}"),
            Err(why) => {
                failed += 1;
                println!("FAIL {name}: {why}");
            }
        }
    }
    println!(
        "selftest: {} of {} passed, {} page faults served, {} KiB of pool used",
        TESTS.len() - failed,
        TESTS.len(),
        pager::FAULTS.load(Ordering::Relaxed),
        (POOL.used() - mkrt::bootinfo::layout::POOL_BASE) >> 10
    );
    u8::from(failed != 0)
}

fn id(w: u64) -> ThreadId {
    ThreadId(w as u32)
}

const LONG: u32 = 1000;

fn tell(root: &Root, t: ThreadId, words: &[u64]) -> Outcome {
    root.tell(t, words).map_err(|_| "could not send to a task")
}

fn expect(root: &Root, from: ThreadId) -> Result<Msg, &'static str> {
    let m = root.expect(from, LONG).map_err(|_| "no report from a task")?;
    if m.label() != REPORT {
        return Err("unexpected message instead of a report");
    }
    Ok(m)
}

// ---- call / reply_wait with all message registers ----

extern "C" fn echo_plus_server() -> ! {
    let _ = booted();
    let (mut from, mut m) = wait();
    loop {
        let mut r = Msg::default();
        r.mr[0] = mkrt::abi::MsgTag::new(m.label() + 1, m.tag().untyped() as u64, 0, 0).0;
        for i in 1..8 {
            r.mr[i] = m.mr[i].wrapping_add(i as u64);
        }
        (from, m) = match reply_wait(from, &mut r) {
            Ok(f) => (f, r),
            Err(_) => wait(),
        };
    }
}

extern "C" fn echo_plus_client() -> ! {
    let (root, b) = booted();
    let server = id(b.word(0));
    let mut good = 0;
    for i in 0..200u64 {
        let words = [i, i * 3, !i, 0xdead_beef_0000 + i, 5 + i, u64::MAX - i, 7];
        let mut m = Msg::new(i + 10, &words);
        let ok = call(server, &mut m).is_ok()
            && m.label() == i + 11
            && m.tag().untyped() == 7
            && (0..7).all(|j| m.word(j) == words[j].wrapping_add(j as u64 + 1));
        good += ok as u64;
    }
    report(root, &[good]);
    park()
}

fn ipc_call_reply(root: &Root, t: &mut Tasks) -> Outcome {
    let s = t.spawn(root, echo_plus_server)?;
    let c = t.spawn(root, echo_plus_client)?;
    tell(root, s, &[])?;
    tell(root, c, &[s.raw()])?;
    let m = expect(root, c)?;
    (m.word(0) == 200).then_some(()).ok_or("replies lost or message registers changed")
}

// ---- send / receive with timeouts ----

extern "C" fn deaf_partner() -> ! {
    let (root, _) = booted();
    // Receive only from the root: nobody else can send to us until it says so.
    if let Ok((_, go)) = receive(root, Timeout::NEVER, NO_WINDOW) {
        let _ = send(id(go.word(0)), &mut Msg::new(1, &[42]), Timeout::NEVER);
    }
    park()
}

extern "C" fn timeout_tester() -> ! {
    let (root, b) = booted();
    let p = id(b.word(0));
    let mut bad = 0u64;
    let is = |r: Result<(), u64>, e: Error| r == Err(e as u64);
    if !is(send(p, &mut Msg::new(1, &[1]), Timeout::ZERO), Error::SendTimeout) {
        bad |= 1;
    }
    if !is(send(p, &mut Msg::new(1, &[1]), Timeout(3)), Error::SendTimeout) {
        bad |= 2;
    }
    if !is(receive(p, Timeout(3), NO_WINDOW).map(|_| ()), Error::RecvTimeout) {
        bad |= 4;
    }
    if !is(receive(ThreadId::ANY, Timeout::ZERO, NO_WINDOW).map(|_| ()), Error::RecvTimeout) {
        bad |= 8;
    }
    report(root, &[bad]);
    match receive(p, Timeout(500), NO_WINDOW) {
        Ok((from, m)) if from == p && m.word(0) == 42 => {}
        _ => bad |= 16,
    }
    report(root, &[bad]);
    park()
}

fn ipc_timeouts(root: &Root, t: &mut Tasks) -> Outcome {
    let p = t.spawn(root, deaf_partner)?;
    let x = t.spawn(root, timeout_tester)?;
    tell(root, p, &[])?;
    tell(root, x, &[p.raw()])?;
    let first = expect(root, x)?.word(0);
    tell(root, p, &[x.raw()])?;
    let bad = first | expect(root, x)?.word(0);
    match bad {
        0 => Ok(()),
        b if b & 3 != 0 => Err("send to a thread not receiving did not time out"),
        b if b & 12 != 0 => Err("receive with nobody sending did not time out"),
        _ => Err("send/receive with a timeout did not deliver"),
    }
}

// ---- a server with two clients ----

extern "C" fn doubling_server() -> ! {
    let _ = booted();
    let (mut from, mut m) = wait();
    loop {
        let mut r = Msg::new(m.label(), &[m.word(0) * 2, m.word(1)]);
        (from, m) = match reply_wait(from, &mut r) {
            Ok(f) => (f, r),
            Err(_) => wait(),
        };
    }
}

extern "C" fn doubling_client() -> ! {
    let (root, b) = booted();
    let (server, me) = (id(b.word(0)), b.word(1));
    let mut good = 0;
    for i in 0..100 {
        let x = me * 1000 + i;
        let mut m = Msg::new(2, &[x, me]);
        good += (call(server, &mut m).is_ok() && m.word(0) == 2 * x && m.word(1) == me) as u64;
    }
    report(root, &[me, good]);
    park()
}

fn server_two_clients(root: &Root, t: &mut Tasks) -> Outcome {
    let s = t.spawn(root, doubling_server)?;
    let c1 = t.spawn(root, doubling_client)?;
    let c2 = t.spawn(root, doubling_client)?;
    tell(root, s, &[])?;
    tell(root, c1, &[s.raw(), 1])?;
    tell(root, c2, &[s.raw(), 2])?;
    let a = expect(root, c1)?;
    let b = expect(root, c2)?;
    (a.word(1) == 100 && b.word(1) == 100)
        .then_some(())
        .ok_or("a client got wrong or missing replies")
}

// ---- map, grant, recursive unmap ----

/// Where relays receive the page.
const WIN: u64 = 0x8400_0000;
const RECV: u64 = 1;
const MAP_TO: u64 = 2;
const GRANT_TO: u64 = 3;
const READ: u64 = 4;
const UNMAP: u64 = 5;

fn win_fpage() -> Fpage {
    Fpage::new(WIN, 12, Rights::RW).unwrap()
}

/// Does what the root says with the page at `WIN`, and reports.
extern "C" fn relay() -> ! {
    let (root, _) = booted();
    loop {
        let Ok((_, c)) = receive(root, Timeout::NEVER, NO_WINDOW) else { continue };
        let result = match c.word(0) {
            RECV => receive(ThreadId::ANY, Timeout(500), window(WIN))
                .map(|(_, m)| m.tag().typed() as u64),
            MAP_TO | GRANT_TO => {
                let mut m = Msg::map(7, win_fpage(), 0, c.word(0) == GRANT_TO);
                send(id(c.word(1)), &mut m, Timeout(500)).map(|_| 0)
            }
            // SAFETY: WIN is in the lazy region: mapped by a test, or by the pager on a fault.
            READ => Ok(unsafe { core::ptr::read_volatile(WIN as *const u64) }),
            UNMAP => sys::unmap(win_fpage(), 0).map(|_| 0),
            _ => Err(0),
        };
        let (ok, v) = match result {
            Ok(v) => (1, v),
            Err(e) => (0, e),
        };
        report(root, &[ok, v]);
    }
}

/// Tell relay `t` to do `words`; its report must say ok. Returns its value.
fn order(root: &Root, t: ThreadId, words: &[u64]) -> Result<u64, &'static str> {
    tell(root, t, words)?;
    let m = expect(root, t)?;
    if m.word(0) != 1 {
        return Err("a relay's map operation failed");
    }
    Ok(m.word(1))
}

/// A fresh pool page holding `value`, as a one-page fpage.
fn page_with(value: u64) -> Result<Fpage, &'static str> {
    let p = POOL.page().ok_or("pool exhausted")?;
    // SAFETY: a fresh page from the root's pool, mapped read-write in this task.
    unsafe { core::ptr::write_volatile(p as *mut u64, value) };
    Ok(Fpage::new(p, 12, Rights::RW).unwrap())
}

/// Map root's `page` to relay `t` (which must be receiving).
fn give(root: &Root, t: ThreadId, page: Fpage) -> Outcome {
    tell(root, t, &[RECV])?;
    send(t, &mut Msg::map(7, page, 0, false), Timeout(500)).map_err(|_| "root could not map")?;
    let m = expect(root, t)?;
    (m.word(0) == 1 && m.word(1) == 2).then_some(()).ok_or("the mapping did not arrive")
}

/// Relay `from` maps (or grants) its page to relay `to`.
fn pass(root: &Root, from: ThreadId, to: ThreadId, op: u64) -> Outcome {
    tell(root, to, &[RECV])?;
    order(root, from, &[op, to.raw()])?;
    let m = expect(root, to)?;
    (m.word(0) == 1 && m.word(1) == 2).then_some(()).ok_or("the mapping did not arrive")
}

const MAGIC: u64 = 0x5eed_cafe_f00d_0001;

fn map_unmap_recursive(root: &Root, t: &mut Tasks) -> Outcome {
    let [a, b, c] = [t.spawn(root, relay)?, t.spawn(root, relay)?, t.spawn(root, relay)?];
    for r in [a, b, c] {
        tell(root, r, &[])?;
    }
    give(root, a, page_with(MAGIC)?)?;
    pass(root, a, b, MAP_TO)?;
    pass(root, b, c, MAP_TO)?;
    if order(root, c, &[READ])? != MAGIC {
        return Err("third-level mapping does not show the page");
    }
    order(root, a, &[UNMAP])?;
    if order(root, c, &[READ])? != 0 {
        return Err("third-level mapping survived unmap of the first level");
    }
    if order(root, b, &[READ])? != 0 {
        return Err("second-level mapping survived unmap of the first level");
    }
    if order(root, a, &[READ])? != MAGIC {
        return Err("unmap without SELF removed the unmapper's own mapping");
    }
    Ok(())
}

fn grant(root: &Root, t: &mut Tasks) -> Outcome {
    let [a, b] = [t.spawn(root, relay)?, t.spawn(root, relay)?];
    for r in [a, b] {
        tell(root, r, &[])?;
    }
    let page = page_with(MAGIC + 1)?;
    give(root, a, page)?;
    pass(root, a, b, GRANT_TO)?;
    if order(root, b, &[READ])? != MAGIC + 1 {
        return Err("granted page not visible to the receiver");
    }
    if order(root, a, &[READ])? != 0 {
        return Err("granter still has the page");
    }
    sys::unmap(page, 0).map_err(|_| "root unmap failed")?;
    if order(root, b, &[READ])? != 0 {
        return Err("granted mapping survived the root's unmap");
    }
    Ok(())
}

// ---- lazy allocation through the pager ----

const LAZY_TEST: u64 = 0x8800_0000;

extern "C" fn lazy_toucher() -> ! {
    let (root, _) = booted();
    let mut sum = 0;
    for i in 0..8u64 {
        let p = (LAZY_TEST + i * 4096) as *mut u64;
        // SAFETY: the lazy region: the pager maps a zero page on the first touch.
        unsafe {
            sum += core::ptr::read_volatile(p);
            core::ptr::write_volatile(p, (i + 1) * 7);
            sum += core::ptr::read_volatile(p);
        }
    }
    report(root, &[sum]);
    park()
}

fn pager_lazy_alloc(root: &Root, t: &mut Tasks) -> Outcome {
    let before = pager::FAULTS.load(Ordering::Relaxed);
    let l = t.spawn(root, lazy_toucher)?;
    tell(root, l, &[])?;
    let sum = expect(root, l)?.word(0);
    let faults = pager::FAULTS.load(Ordering::Relaxed) - before;
    if sum != 7 * 36 {
        return Err("lazily mapped pages did not hold what was written");
    }
    (faults >= 8).then_some(()).ok_or("the pager did not see the faults")
}

// ---- interrupts as IPC ----

pub const TEST_IRQ: u64 = 10;

extern "C" fn irq_handler() -> ! {
    let (root, b) = booted();
    let line = b.word(0);
    let mut good = 0;
    for _ in 0..3 {
        port::outb(port::RAISE_IRQ, line as u8);
        match receive(ThreadId::irq(line as u16), Timeout(100), NO_WINDOW) {
            Ok((from, m))
                if from == ThreadId::irq(line as u16)
                    && m.label() == label::INTERRUPT
                    && m.word(0) == line =>
            {
                good += 1
            }
            _ => {}
        }
        let _ = sys::irq_control(irq_control::ACK, line, ThreadId::NIL);
    }
    report(root, &[good]);
    park()
}

fn irq_as_ipc(root: &Root, t: &mut Tasks) -> Outcome {
    let h = t.spawn(root, irq_handler)?;
    sys::irq_control(irq_control::ATTACH, TEST_IRQ, h).map_err(|_| "attach failed")?;
    tell(root, h, &[TEST_IRQ])?;
    let good = expect(root, h)?.word(0);
    let _ = sys::irq_control(irq_control::DETACH, TEST_IRQ, ThreadId::NIL);
    (good == 3).then_some(()).ok_or("interrupts were not delivered as messages")
}

// ---- preemption ----

extern "C" fn spinner() -> ! {
    let _ = booted();
    loop {
        core::hint::spin_loop();
    }
}

extern "C" fn worker() -> ! {
    let (root, _) = booted();
    let mut x = 0u64;
    for i in 0..20_000_000u64 {
        x = black_box(x.wrapping_add(i));
    }
    report(root, &[x]);
    park()
}

fn preemption(root: &Root, t: &mut Tasks) -> Outcome {
    let s = t.spawn(root, spinner)?;
    let w = t.spawn(root, worker)?;
    tell(root, s, &[])?;
    tell(root, w, &[])?;
    expect(root, w).map(|_| ()).map_err(|_| "a spinning task starved another")
}

// ---- a faulting task is restarted by its supervisor ----

extern "C" fn crasher() -> ! {
    let _ = booted();
    lang::crash()
}

extern "C" fn crasher_again() -> ! {
    let (root, _) = booted();
    report(root, &[0xe]);
    park()
}

extern "C" fn bystander() -> ! {
    let (root, _) = booted();
    let mut n = 0u64;
    loop {
        n += 1;
        if n.is_multiple_of(1024) && receive(root, Timeout::ZERO, NO_WINDOW).is_ok() {
            report(root, &[n]);
            park()
        }
    }
}

fn fault_restart(root: &Root, t: &mut Tasks) -> Outcome {
    let k = t.spawn(root, bystander)?;
    tell(root, k, &[])?;
    let e = t.spawn(root, crasher)?;
    tell(root, e, &[])?;
    let m = root.expect(e, LONG).map_err(|_| "no exception message from the faulting task")?;
    if m.label() != label::EXCEPTION || m.word(0) != 6 {
        return Err("the supervisor got the wrong message for #UD");
    }
    let restart = [crasher_again as *const () as u64, CHILD_STACK_TOP - 8];
    send(e, &mut Msg::new(0, &restart), Timeout(500)).map_err(|_| "restart reply failed")?;
    tell(root, e, &[])?;
    if expect(root, e)?.word(0) != 0xe {
        return Err("the restarted task did not run");
    }
    tell(root, k, &[])?;
    let n = expect(root, k)?.word(0);
    (n > 0).then_some(()).ok_or("the other task stopped")
}
