//! A guest server: the task that owns a guest VM, its RAM and its exits.
//!
//! The root hands the server the guest's RAM (1 MiB of its pool, one map item, the
//! sigma0 role). The server makes the guest (`task_new` with `GUEST`: an address space
//! that is guest-physical memory, whose thread is the vCPU) and becomes the vCPU's
//! pager. The vCPU's first exit, `START`, is answered with a map item that puts the RAM
//! at guest-physical 0; the vmm then loads its exit-loop guest there (the firmware
//! role, `vmm/src/mk/guest.rs`) and runs it. From then on every port access of the
//! guest arrives here as an IPC from the vCPU thread, and the reply resumes it: `in`
//! from 0x81 answers 1, 2, 3, ...; `out` to 0x87 ends the run, and the server reports
//! what it saw to the root.

use mkrt::abi::{guest, label, task_new, Fpage, MsgTag, Rights, ThreadId, Timeout};
use mkrt::msg::{receive, reply_wait, send, Msg};
use mkrt::println;

use crate::tests::{Outcome, Tasks};
use crate::{park, report, Root, BOOT, POOL};

/// log2 of the guest's RAM (what the vmm's exit-loop guest needs).
const RAM_LOG2: u32 = 20;
/// Where the server keeps the guest's RAM in its own address space.
const RAM_WINDOW: u64 = 0xa000_0000;

/// What a finished run of the exit-loop guest looked like.
struct Seen {
    nulls: u64,
    ins: u64,
    sum: u64,
    cycles: u64,
    other: u64,
    vcpu: ThreadId,
}

extern "C" fn server() -> ! {
    let window = Fpage::new(RAM_WINDOW, RAM_LOG2 as u8, Rights::ALL).expect("aligned window");
    // The boot message: our own id, and the RAM as a map item.
    let Ok((root, boot)) = receive(ThreadId::ANY, Timeout::NEVER, window) else { park() };
    let me = ThreadId(boot.word(0) as u32);
    let vcpu = match mkrt::sys::task_new(me, 0, 0, task_new::GUEST) {
        Ok(v) => v,
        Err(e) => {
            report(root, &[1, e]);
            park()
        }
    };
    let mut seen = Seen { nulls: 0, ins: 0, sum: 0, cycles: 0, other: 0, vcpu };
    let Ok((mut from, mut m)) = receive(vcpu, Timeout(500), mkrt::msg::NO_WINDOW) else {
        report(root, &[2, vcpu.raw()]);
        park()
    };
    loop {
        if from != vcpu || m.label() != label::GUEST_EXIT {
            seen.other += 1;
        }
        let (kind, addr, data) = (m.word(0) & 0xff, m.word(1), m.word(2));
        let mut reply = match kind {
            guest::START => {
                let ram = Fpage::new(RAM_WINDOW, RAM_LOG2 as u8, Rights::ALL).expect("fpage");
                Msg::map(0, ram, 0, false)
            }
            guest::IO_OUT if addr == 0x87 => break,
            guest::IO_OUT => {
                match addr {
                    0x80 => seen.nulls += 1,
                    0x84 => seen.cycles = (seen.cycles & !0xffff_ffff) | (data & 0xffff_ffff),
                    0x86 => seen.cycles = (seen.cycles & 0xffff_ffff) | (data << 32),
                    0x85 => seen.sum = data & 0xff,
                    0x82 => {}
                    _ => seen.other += 1,
                }
                Msg::new(0, &[])
            }
            guest::IO_IN if addr == 0x81 => {
                seen.ins += 1;
                Msg::new(0, &[seen.ins])
            }
            guest::HALT => break,
            // unknown ports and MMIO read as all ones, writes are dropped
            _ => {
                seen.other += 1;
                Msg::new(0, &[u64::MAX])
            }
        };
        (from, m) = match reply_wait(from, &mut reply) {
            Ok(f) => (f, reply),
            Err(_) => {
                report(root, &[3, 0]);
                park()
            }
        };
    }
    // The vCPU waits in its last exit until the root deletes the guest.
    report(root, &[0, seen.nulls, seen.ins, seen.sum, seen.cycles, seen.other, seen.vcpu.raw()]);
    park()
}

/// Run the exit-loop guest under a guest server; the server's report.
fn run(root: &Root, t: &mut Tasks) -> Result<Msg, &'static str> {
    let ram = POOL.run(RAM_LOG2).ok_or("no 1 MiB run left in the pool")?;
    let s = t.spawn_with(root, server, task_new::PRIVILEGED)?;
    let fpage = Fpage::new(ram, RAM_LOG2 as u8, Rights::ALL).ok_or("RAM fpage")?;
    let mut boot = Msg::map(BOOT, fpage, RAM_WINDOW, false);
    boot.mr[0] = MsgTag::new(BOOT, 1, 2, 0).0;
    boot.mr[3] = boot.mr[2];
    boot.mr[2] = boot.mr[1];
    boot.mr[1] = s.raw();
    send(s, &mut boot, Timeout(500)).map_err(|_| "could not send the guest server its RAM")?;
    let m = root.expect(s, 30_000).map_err(|_| "no report from the guest server")?;
    if m.word(6) != 0 {
        t.add(ThreadId(m.word(6) as u32));
    }
    match m.word(0) {
        0 => Ok(m),
        1 => Err("task_new(GUEST) failed"),
        2 => Err("the vCPU sent no START exit"),
        _ => Err("the vCPU went away during an exit"),
    }
}

/// Selftest: the guest's exits arrive as IPC, the replies carry the values it reads.
pub fn selftest(root: &Root, t: &mut Tasks) -> Outcome {
    let m = run(root, t)?;
    let (nulls, ins, sum, other) = (m.word(1), m.word(2), m.word(3), m.word(5));
    if ins != 16 || sum != 136 {
        return Err("the values read by `in` did not arrive (sum of 1..16 should be 136)");
    }
    if nulls == 0 || other != 0 {
        return Err("null exits missing, or exits nobody expected");
    }
    Ok(())
}

/// `--bench-exit`: one long run; the vmm prints the comparison with native.
pub fn bench(root: &Root) -> u8 {
    let mut t = Tasks::default();
    let status = match run(root, &mut t) {
        Ok(m) => {
            let (nulls, cycles) = (m.word(1), m.word(4));
            println!(
                "guest server: {nulls} null exits as IPC, {} guest TSC cycles each",
                cycles / nulls.max(1)
            );
            u8::from(m.word(3) != 136)
        }
        Err(why) => {
            println!("guest server: {why}");
            1
        }
    };
    t.kill_all(root);
    status
}
