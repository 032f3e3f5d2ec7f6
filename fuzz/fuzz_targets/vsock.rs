//! virtio-vsock (`Vsock::queue_notify`, `backend_ready`) with a fake muxer: transmit
//! packets with any header and payload layout, receive chains of any shape, packets
//! from the muxer of any size (including a muxer that claims more than fits, or that
//! says it has packets and then produces none), resets, and ring scribbles. Never
//! panics; the muxer only gets packets that passed the documented checks, and every
//! used receive chain is empty or holds at least a header and no more than its room.

#![no_main]

use arbitrary::Arbitrary;
use devices::virtio::vsock::{self, PacketHeader, Vsock};
use devices::virtio::{GuestMemory, Queue, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{
    driver_write, guest_ram, queue_size, spread_taint, Driver, FakeVsock, Layout, Scribble,
    VsockPacket, GUEST_CID,
};

/// A header field the fuzzer either leaves valid or sets to anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Field<T> {
    Valid,
    Raw(T),
}

impl<T: Copy> Field<T> {
    fn or(self, valid: T) -> T {
        match self {
            Field::Valid => valid,
            Field::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PayloadLen {
    /// The length of the buffers after the header.
    Exact,
    Small(u16),
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct TxHeader {
    src_cid: Field<u64>,
    dst_cid: Field<u64>,
    type_: Field<u16>,
    op: u8,
    src_port: u32,
    dst_port: u32,
    len: PayloadLen,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Transmit {
        hdr: Option<TxHeader>,
        layout: Layout,
        notify: bool,
    },
    PostRx {
        layout: Layout,
        notify: bool,
    },
    Notify(u8),
    Packets(Vec<VsockPacket>),
    Liar(bool),
    BackendReady,
    ReadConfig {
        offset: u8,
        len: u8,
    },
    Reset,
    Scribble(Scribble),
}

#[derive(Arbitrary, Debug)]
struct Input {
    qsize: [u8; 3],
    event_idx: bool,
    ops: Vec<Op>,
    ram: Vec<u8>,
}

struct Rig {
    queues: [Queue; 3],
    drivers: [Driver; 3],
    sizes: [u16; 3],
    event_idx: bool,
}

impl Rig {
    fn reset(&mut self, mem: &dyn GuestMemory) {
        for q in 0..3 {
            self.queues[q].reset();
            self.drivers[q].reinit(mem, self.sizes[q]);
            self.drivers[q].configure(&mut self.queues[q], self.event_idx);
            self.queues[q].validate(mem).unwrap();
        }
    }
}

fuzz_target!(|input: Input| {
    let mem = guest_ram(&input.ram);
    let mut dev = Vsock::new(GUEST_CID, FakeVsock::default());
    let max = dev.queue_max_sizes()[0];
    let sizes = input.qsize.map(|s| queue_size(s, max));
    let mut rig = Rig {
        queues: [Queue::new(max), Queue::new(max), Queue::new(max)],
        drivers: [
            Driver::new(0, sizes[0]),
            Driver::new(1, sizes[1]),
            Driver::new(2, sizes[2]),
        ],
        sizes,
        event_idx: input.event_idx,
    };
    rig.reset(&mem);
    dev.activate(0);

    for op in input.ops.iter().take(64) {
        let kick = match op {
            Op::Transmit {
                hdr,
                layout,
                notify,
            } => {
                let bufs = &layout.bufs(vsock::HDR_LEN as u32);
                if let (Some(h), Some(b)) = (hdr, bufs.first()) {
                    let rest: u32 = bufs
                        .iter()
                        .take_while(|b| !b.writable)
                        .map(|b| b.len.get())
                        .fold(0u32, u32::wrapping_add)
                        .wrapping_sub(vsock::HDR_LEN as u32);
                    let hdr = PacketHeader {
                        src_cid: h.src_cid.or(GUEST_CID),
                        dst_cid: h.dst_cid.or(vsock::HOST_CID),
                        src_port: h.src_port,
                        dst_port: h.dst_port,
                        len: match h.len {
                            PayloadLen::Exact => rest,
                            PayloadLen::Small(n) => u32::from(n),
                            PayloadLen::Raw(n) => n,
                        },
                        type_: h.type_.or(vsock::TYPE_STREAM),
                        op: u16::from(h.op % 9),
                        flags: h.flags,
                        buf_alloc: h.buf_alloc,
                        fwd_cnt: h.fwd_cnt,
                    };
                    if driver_write(&mem, b.addr.get(), &hdr.to_bytes()) {
                        rig.drivers[vsock::TX_QUEUE].clean = false;
                    }
                }
                rig.drivers[vsock::TX_QUEUE].post(&mem, bufs);
                notify.then_some(Some(vsock::TX_QUEUE))
            }
            Op::PostRx { layout, notify } => {
                rig.drivers[vsock::RX_QUEUE].post(&mem, &layout.bufs(0));
                notify.then_some(Some(vsock::RX_QUEUE))
            }
            Op::Notify(i) => Some(Some(usize::from(*i % 3))),
            Op::Packets(p) => {
                dev.backend_mut().outbox.extend(p.iter().take(300).copied());
                None
            }
            Op::Liar(on) => {
                dev.backend_mut().liar = *on;
                None
            }
            Op::BackendReady => Some(None),
            Op::ReadConfig { offset, len } => {
                let mut b = vec![0xffu8; usize::from(*len % 16)];
                dev.read_config(u64::from(*offset), &mut b);
                None
            }
            Op::Reset => {
                let resets = dev.backend().resets;
                dev.reset();
                assert_eq!(dev.backend().resets, resets + 1, "reset not passed on");
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
        spread_taint(&mut rig.drivers);
        let r = match which {
            Some(i) => dev.queue_notify(i, &mut rig.queues, &mem),
            None => dev.backend_ready(&mut rig.queues, &mem),
        };
        match r {
            Ok(()) => {
                let clean = rig.drivers[vsock::RX_QUEUE].clean;
                for (_, len) in rig.drivers[vsock::RX_QUEUE].collect_used(&mem) {
                    assert!(
                        !clean || len == 0 || len as usize >= vsock::HDR_LEN,
                        "a {len}-byte packet"
                    );
                }
                for d in &mut rig.drivers[1..] {
                    d.collect_used(&mem);
                }
                for q in &mut rig.queues {
                    let _ = q.needs_notification(&mem);
                }
            }
            Err(_) => {
                dev.reset();
                rig.reset(&mem);
            }
        }
    }
});
