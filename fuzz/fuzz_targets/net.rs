//! virtio-net (`Net::queue_notify`, `backend_ready`) with a fake tap: transmit chains of
//! any layout and header, receive chains, frames of any size and offload flags from the
//! tap, backend errors, feature negotiation and resets, and a driver that scribbles
//! over its rings. Never panics; the tap only ever gets frames of a legal size, and no
//! used length exceeds the chain's writable room.

#![no_main]

use arbitrary::Arbitrary;
use devices::virtio::net::{self, Net, NetError};
use devices::virtio::{GuestMemory, Queue, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex};

use vmm_fuzz::{
    driver_write, guest_ram, queue_size, spread_taint, Driver, FakeNet, Frame, Layout, Scribble,
    Wire,
};

const RX: usize = 0;
const TX: usize = 1;

#[derive(Arbitrary, Debug, Clone, Copy)]
struct NetHdr {
    flags: u8,
    gso: u8,
    hdr_len: u16,
    gso_size: u16,
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    /// A transmit chain; a header written at its first buffer if given.
    Transmit {
        hdr: Option<NetHdr>,
        layout: Layout,
        notify: bool,
    },
    /// A receive chain.
    PostRx {
        layout: Layout,
        notify: bool,
    },
    NotifyTx,
    NotifyRx,
    /// Another queue index.
    NotifyOther(u8),
    /// The tap has frames.
    Frames(Vec<Frame>),
    BackendReady,
    RecvError(bool),
    Activate(u64),
    Reset,
    Scribble(Scribble),
}

#[derive(Arbitrary, Debug)]
struct Input {
    features: u64,
    qsize: [u8; 2],
    event_idx: bool,
    fail_send: bool,
    fail_offloads: bool,
    ops: Vec<Op>,
    ram: Vec<u8>,
}

struct Rig {
    queues: [Queue; 2],
    drivers: [Driver; 2],
    sizes: [u16; 2],
    event_idx: bool,
}

impl Rig {
    fn reset(&mut self, mem: &dyn GuestMemory) {
        for q in 0..2 {
            self.queues[q].reset();
            self.drivers[q].reinit(mem, self.sizes[q]);
            self.drivers[q].configure(&mut self.queues[q], self.event_idx);
            self.queues[q].validate(mem).unwrap();
        }
    }
}

fuzz_target!(|input: Input| {
    let mem = guest_ram(&input.ram);
    let wire = Arc::new(Mutex::new(Wire::default()));
    let mut dev = Net::new(
        FakeNet {
            wire: wire.clone(),
            fail_send: input.fail_send,
            fail_offloads: input.fail_offloads,
            ..FakeNet::default()
        },
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
    );
    let max = dev.queue_max_sizes()[0];
    let sizes = input.qsize.map(|s| queue_size(s, max));
    let mut rig = Rig {
        queues: [Queue::new(max), Queue::new(max)],
        drivers: [Driver::new(RX, sizes[0]), Driver::new(TX, sizes[1])],
        sizes,
        event_idx: input.event_idx,
    };
    rig.reset(&mem);
    dev.activate(input.features & dev.features());

    for op in input.ops.iter().take(64) {
        let kick = match op {
            Op::Transmit {
                hdr,
                layout,
                notify,
            } => {
                let bufs = &layout.bufs(net::HDR_LEN as u32);
                if let (Some(h), Some(b)) = (hdr, bufs.first()) {
                    let mut raw = [0u8; net::HDR_LEN];
                    raw[0] = h.flags;
                    raw[1] = h.gso;
                    raw[2..4].copy_from_slice(&h.hdr_len.to_le_bytes());
                    raw[4..6].copy_from_slice(&h.gso_size.to_le_bytes());
                    if driver_write(&mem, b.addr.get(), &raw) {
                        rig.drivers[TX].clean = false;
                    }
                }
                rig.drivers[TX].post(&mem, bufs);
                notify.then_some(Some(TX))
            }
            Op::PostRx { layout, notify } => {
                rig.drivers[RX].post(&mem, &layout.bufs(0));
                notify.then_some(Some(RX))
            }
            Op::NotifyTx => Some(Some(TX)),
            Op::NotifyRx => Some(Some(RX)),
            Op::NotifyOther(i) => Some(Some(usize::from(*i))),
            Op::Frames(frames) => {
                wire.lock()
                    .unwrap()
                    .inbox
                    .extend(frames.iter().take(300).copied());
                None
            }
            Op::BackendReady => Some(None),
            Op::RecvError(closed) => {
                wire.lock().unwrap().recv_error = Some(if *closed {
                    NetError::Closed
                } else {
                    NetError::Io(5)
                });
                None
            }
            Op::Activate(f) => {
                let f = f & dev.features();
                dev.activate(f);
                assert_eq!(dev.backend().offloads, Some(f), "offloads not passed on");
                None
            }
            Op::Reset => {
                dev.reset();
                wire.lock().unwrap().recv_error = None;
                rig.reset(&mem);
                None
            }
            Op::Scribble(s) => {
                s.apply(&mem);
                rig.drivers.iter_mut().for_each(|d| d.clean = false);
                None
            }
        };
        let Some(which) = kick else {
            continue;
        };
        // Like the transport: notifications for queues that do not exist are ignored.
        if which.is_some_and(|i| i >= rig.queues.len()) {
            continue;
        }
        spread_taint(&mut rig.drivers);
        let r = match which {
            Some(i) => dev.queue_notify(i, &mut rig.queues, &mem),
            None => dev.backend_ready(&mut rig.queues, &mem),
        };
        match r {
            Ok(()) => {
                for d in &mut rig.drivers {
                    d.collect_used(&mem);
                }
                for q in &mut rig.queues {
                    let _ = q.needs_notification(&mem);
                }
            }
            Err(_) => {
                assert!(!dev.wants_input(), "a failed device still wants input");
                dev.reset();
                wire.lock().unwrap().recv_error = None;
                rig.reset(&mem);
                dev.activate(input.features & dev.features());
            }
        }
    }
    let s = dev.stats();
    assert!(s.tx_frames as usize <= dev.backend().sent);
});
