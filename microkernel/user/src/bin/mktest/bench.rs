//! The IPC micro-benchmark: call + reply_wait round trips between a client and a server
//! in two address spaces, timed with the TSC in the client; then ten round trips with
//! the vmm single-stepping VM0 (started and stopped through the step-count port), so
//! the vmm can count the ring-0 instructions per round trip.

use mkrt::msg::{call, reply_wait, wait, Msg};
use mkrt::port::{outb, rdtsc, STEP_COUNT};
use mkrt::println;

use crate::{booted, park, report, Root, REPORT};

const N: usize = 1000;
pub const STEPPED: u8 = 10;

extern "C" fn server() -> ! {
    let _ = booted();
    let (mut from, mut m) = wait();
    loop {
        (from, m) = match reply_wait(from, &mut m) {
            Ok(f) => (f, m),
            Err(_) => wait(),
        };
    }
}

extern "C" fn client() -> ! {
    let (root, b) = booted();
    let s = mkrt::abi::ThreadId(b.word(0) as u32);
    let mut m = Msg::new(1, &[1, 2]);
    for _ in 0..100 {
        let _ = call(s, &mut m);
    }
    let mut t = [0u64; N];
    for x in t.iter_mut() {
        let t0 = rdtsc();
        let _ = call(s, &mut m);
        *x = rdtsc() - t0;
    }
    t.sort_unstable();
    outb(STEP_COUNT, STEPPED);
    for _ in 0..STEPPED {
        let _ = call(s, &mut m);
    }
    outb(STEP_COUNT, 0);
    report(root, &[t[0], t[N / 2], t[N * 99 / 100]]);
    park()
}

pub fn run(root: &Root) -> u8 {
    let (Ok(s), Ok(c)) = (root.spawn(server, 0), root.spawn(client, 0)) else {
        println!("bench: cannot create tasks");
        return 1;
    };
    let ok = root.tell(s, &[]).is_ok() && root.tell(c, &[s.raw()]).is_ok();
    let m = match root.expect(c, 60_000) {
        Ok(m) if ok && m.label() == REPORT => m,
        Ok(m) => {
            println!(
                "bench: unexpected message from the client: label {:#x} words {:#x} {:#x} {:#x}",
                m.label(),
                m.word(0),
                m.word(1),
                m.word(2)
            );
            return 1;
        }
        Err(e) => {
            println!("bench: no result (error {e})");
            return 1;
        }
    };
    println!(
        "bench: call + reply_wait round trip, two address spaces, {N} iterations: min {} / median {} / p99 {} TSC cycles (guest rdtsc in the client)",
        m.word(0), m.word(1), m.word(2)
    );
    println!("bench: seL4 (published, Skylake, call + reply): 772 cycles");
    root.kill(s);
    root.kill(c);
    0
}
