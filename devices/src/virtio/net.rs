//! virtio-net (virtio 1.x §5.1): a receive queue (0) and a transmit queue (1) carrying
//! Ethernet frames, each behind the 12-byte `virtio_net_hdr_v1`. The header is passed
//! through to and from the backend unchanged (a tap with `IFF_VNET_HDR` speaks exactly
//! this), except that the device sets `num_buffers` to 1 on receive.
//!
//! Offered: `MAC`, `STATUS` (link always up), and the checksum/TSO offloads a tap can
//! do: `CSUM`, `HOST_TSO4/6`, `HOST_ECN` (guest to host) and `GUEST_CSUM`,
//! `GUEST_TSO4/6`, `GUEST_ECN` (host to guest). Not offered: `MRG_RXBUF` (every frame
//! goes into one receive chain; with guest TSO Linux then posts 64 KiB+ chains), UFO,
//! control queue, multiqueue. `activate` hands the negotiated features to the backend
//! (`set_offloads`) so it produces only what the guest accepted.
//!
//! Refused (the chain is returned with length 0 and the frame counted as dropped): a
//! transmit chain with device-writable buffers, shorter than the header, longer than
//! `MAX_FRAME`, outside guest RAM, or asking for an offload that was not negotiated; a
//! received frame that does not fit its chain or guest RAM. Received runts, frames
//! longer than `MAX_FRAME` and frames with an offload the guest did not accept are
//! dropped before they take a chain.
//!
//! Bounds: one `MAX_FRAME` buffer per direction; at most one received frame is held
//! while the guest has no receive buffers, and the backend is not read meanwhile
//! (`wants_input`); at most `RX_BUDGET` frames are received per call.

use alloc::vec;
use alloc::vec::Vec;

use super::queue::Chain;
use super::{device_type, read_config_bytes, DeviceError, GuestMemory, Queue, VirtioDevice};

/// Feature bits (virtio 1.x §5.1.3).
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const GUEST_UFO: u64 = 1 << 10;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const HOST_UFO: u64 = 1 << 14;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

/// `virtio_net_hdr_v1` (with `num_buffers`): always this long, as `VERSION_1` is always
/// negotiated.
pub const HDR_LEN: usize = 12;
/// The largest frame either way: the header plus a 64 KiB GSO packet and its
/// Ethernet header.
pub const MAX_FRAME: usize = HDR_LEN + 65550;
/// Frames received per `backend_ready` or receive-queue notification, at most.
pub const RX_BUDGET: usize = 256;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const S_LINK_UP: u16 = 1;

const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

/// The backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// A host call failed with this `errno`.
    #[error("backend I/O error (errno {0})")]
    Io(i32),
    /// The backend can no longer deliver frames (a tap read returned end-of-file).
    #[error("backend closed")]
    Closed,
}

/// The wire behind the device (a tap device on the host). Frames in both directions
/// start with the 12-byte `virtio_net_hdr_v1`.
pub trait NetBackend: Send {
    /// Transmit one frame.
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError>;
    /// Receive one frame into `buf` (`MAX_FRAME` bytes) and return its length, or
    /// `None` if none is waiting. A length above `buf.len()` means the frame did not
    /// fit; the device drops it.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError>;
    /// Produce only frames with the offloads the guest accepted: its `GUEST_CSUM`,
    /// `GUEST_TSO4`, `GUEST_TSO6` and `GUEST_ECN` bits in `guest_features`.
    fn set_offloads(&mut self, guest_features: u64) -> Result<(), NetError>;
}

/// Counters and the errors the integrator may want to log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    /// Malformed transmit chains and frames the backend refused.
    pub tx_dropped: u64,
    pub rx_frames: u64,
    /// Frames that did not fit their chain or guest RAM, runts, oversized frames, and
    /// frames with offloads the guest did not accept.
    pub rx_dropped: u64,
    /// The `recv` error that stopped reception until the next device reset.
    pub rx_error: Option<NetError>,
    /// Why the last `set_offloads` failed, if it did.
    pub offload_error: Option<NetError>,
}

pub struct Net<B> {
    backend: B,
    config: [u8; 8],
    /// Negotiated features, once the driver is up.
    features: u64,
    active: bool,
    /// A queue was found corrupt; the transport wants a reset.
    failed: bool,
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` waiting for a receive chain.
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    stats: NetStats,
}

const OFFERED: u64 = feature::CSUM
    | feature::GUEST_CSUM
    | feature::MAC
    | feature::GUEST_TSO4
    | feature::GUEST_TSO6
    | feature::GUEST_ECN
    | feature::HOST_TSO4
    | feature::HOST_TSO6
    | feature::HOST_ECN
    | feature::STATUS;

impl<B: NetBackend> Net<B> {
    pub fn new(backend: B, mac: [u8; 6]) -> Self {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        Net {
            backend,
            config,
            features: 0,
            active: false,
            failed: false,
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: None,
            tx_buf: vec![0; MAX_FRAME],
            stats: NetStats::default(),
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Whether the host should watch the backend for input now: the driver is up, and
    /// no received frame is waiting for the guest to post receive buffers (the next
    /// receive-queue notification delivers it and reading resumes).
    pub fn wants_input(&self) -> bool {
        self.active && !self.failed && self.rx_pending.is_none() && self.stats.rx_error.is_none()
    }

    /// Move frames from the backend into receive chains, `RX_BUDGET` at most.
    fn rx(&mut self, queues: &mut [Queue], mem: &dyn GuestMemory) -> Result<(), DeviceError> {
        if !self.active || self.stats.rx_error.is_some() {
            return Ok(());
        }
        let Some(q) = queues.get_mut(RX) else {
            return Ok(());
        };
        for _ in 0..RX_BUDGET {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(Some(len)) => {
                        if !self.accept_rx(len) {
                            self.stats.rx_dropped += 1;
                            continue;
                        }
                        self.rx_pending = Some(len);
                        len
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        self.stats.rx_error = Some(e);
                        return Ok(());
                    }
                },
            };
            // An unready receive queue never gets buffers: the frame stays pending.
            if !q.ready {
                return Ok(());
            }
            let chain = match q.pop(mem)? {
                Some(chain) => chain,
                // Ask for a notification, and look again in case buffers came meanwhile.
                None if q.enable_notification(mem)? => match q.pop(mem)? {
                    Some(chain) => chain,
                    None => return Ok(()),
                },
                None => return Ok(()),
            };
            self.rx_pending = None;
            let used = self.write_frame(mem, &chain, len);
            q.add_used(mem, chain.head, used)?;
        }
        Ok(())
    }

    /// Check a frame just received into `rx_buf` and set its `num_buffers`.
    fn accept_rx(&mut self, len: usize) -> bool {
        if !(HDR_LEN..=self.rx_buf.len()).contains(&len) {
            return false;
        }
        let bits = [
            feature::GUEST_CSUM,
            feature::GUEST_TSO4,
            feature::GUEST_TSO6,
            feature::GUEST_ECN,
        ];
        if !offloads_allowed(&self.rx_buf, self.features, bits) {
            return false;
        }
        self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
        true
    }

    /// Copy the pending frame into `chain`; returns the used length (0: dropped).
    fn write_frame(&mut self, mem: &dyn GuestMemory, chain: &Chain, len: usize) -> u32 {
        let mut w = chain.writer();
        if w.remaining() < len as u64 || w.write_all(mem, &self.rx_buf[..len]).is_err() {
            self.stats.rx_dropped += 1;
            return 0;
        }
        self.stats.rx_frames += 1;
        len as u32
    }

    fn tx(&mut self, queues: &mut [Queue], mem: &dyn GuestMemory) -> Result<(), DeviceError> {
        let Some(q) = queues.get_mut(TX) else {
            return Ok(());
        };
        loop {
            while let Some(chain) = q.pop(mem)? {
                if self.send_chain(mem, &chain) {
                    self.stats.tx_frames += 1;
                } else {
                    self.stats.tx_dropped += 1;
                }
                q.add_used(mem, chain.head, 0)?;
            }
            if !q.enable_notification(mem)? {
                return Ok(());
            }
        }
    }

    /// Gather one transmit chain and send it; false if it was dropped.
    fn send_chain(&mut self, mem: &dyn GuestMemory, chain: &Chain) -> bool {
        if chain.descs.iter().any(|d| d.writable) {
            return false;
        }
        let mut r = chain.reader();
        let len = r.remaining();
        if !(HDR_LEN as u64..=MAX_FRAME as u64).contains(&len) {
            return false;
        }
        let frame = &mut self.tx_buf[..len as usize];
        if r.read_exact(mem, frame).is_err() {
            return false;
        }
        let bits = [
            feature::CSUM,
            feature::HOST_TSO4,
            feature::HOST_TSO6,
            feature::HOST_ECN,
        ];
        offloads_allowed(frame, self.features, bits) && self.backend.send(frame).is_ok()
    }

    fn note(&mut self, r: Result<(), DeviceError>) -> Result<(), DeviceError> {
        self.failed |= r.is_err();
        r
    }
}

/// Whether the header at the start of `frame` asks only for offloads in `features`,
/// given the direction's `[checksum, tso4, tso6, ecn]` feature bits.
fn offloads_allowed(frame: &[u8], features: u64, [csum, tso4, tso6, ecn]: [u64; 4]) -> bool {
    let has = |bit: u64| features & bit != 0;
    if frame[0] & HDR_F_NEEDS_CSUM != 0 && !has(csum) {
        return false;
    }
    let gso = frame[1];
    match gso & !GSO_ECN {
        GSO_NONE => gso == GSO_NONE,
        GSO_TCPV4 => has(tso4) && (gso & GSO_ECN == 0 || has(ecn)),
        GSO_TCPV6 => has(tso6) && (gso & GSO_ECN == 0 || has(ecn)),
        // UDP (UFO) is never offered; anything else is unknown.
        _ => false,
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        OFFERED
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, features: u64) {
        self.features = features;
        self.active = true;
        self.stats.offload_error = self.backend.set_offloads(features).err();
    }

    fn reset(&mut self) {
        self.features = 0;
        self.active = false;
        self.failed = false;
        self.rx_pending = None;
        self.stats.rx_error = None;
    }

    fn queue_notify(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &dyn GuestMemory,
    ) -> Result<(), DeviceError> {
        let r = match index {
            RX => self.rx(queues, mem),
            TX => self.tx(queues, mem),
            _ => Ok(()),
        };
        self.note(r)
    }

    fn backend_ready(
        &mut self,
        queues: &mut [Queue],
        mem: &dyn GuestMemory,
    ) -> Result<(), DeviceError> {
        let r = self.rx(queues, mem);
        self.note(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mem::VecMemory;
    use crate::virtio::testing::{driver_queues, DriverQueue};
    use alloc::collections::VecDeque;

    /// A wire in memory: frames to receive, frames sent, the last offloads asked for.
    #[derive(Default)]
    struct Fake {
        inbox: VecDeque<Vec<u8>>,
        sent: Vec<Vec<u8>>,
        offloads: Option<u64>,
        recvs: usize,
        recv_error: Option<NetError>,
    }

    impl NetBackend for Fake {
        fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
            self.sent.push(frame.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
            self.recvs += 1;
            if let Some(e) = self.recv_error {
                return Err(e);
            }
            let Some(f) = self.inbox.pop_front() else {
                return Ok(None);
            };
            let n = f.len().min(buf.len());
            buf[..n].copy_from_slice(&f[..n]);
            Ok(Some(f.len()))
        }
        fn set_offloads(&mut self, guest_features: u64) -> Result<(), NetError> {
            self.offloads = Some(guest_features);
            Ok(())
        }
    }

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const BUF: u64 = 0x10000;
    const ALL: u64 = OFFERED;

    struct Rig {
        mem: VecMemory,
        rxq: DriverQueue,
        txq: DriverQueue,
        queues: [Queue; 2],
        net: Net<Fake>,
    }

    /// An activated device with both queues set up (size 256, event index on).
    fn rig(features: u64) -> Rig {
        let mem = VecMemory::new(0, 1 << 20);
        let ([rxq, txq], mut queues) = driver_queues(&mem, 256, QUEUE_SIZE);
        for q in &mut queues {
            q.set_event_idx(true);
        }
        let mut net = Net::new(Fake::default(), MAC);
        net.activate(features);
        Rig {
            mem,
            rxq,
            txq,
            queues,
            net,
        }
    }

    /// A frame: header with `flags` and `gso_type` (and garbage in `num_buffers`), then `payload`.
    fn frame(flags: u8, gso: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN];
        f[0] = flags;
        f[1] = gso;
        f[10..12].copy_from_slice(&[0xff, 0xff]);
        f.extend_from_slice(payload);
        f
    }

    impl Rig {
        fn notify(&mut self, q: usize) {
            self.net
                .queue_notify(q, &mut self.queues, &self.mem)
                .unwrap();
        }
        fn backend_ready(&mut self) {
            self.net.backend_ready(&mut self.queues, &self.mem).unwrap();
        }
        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0; len];
            self.mem.read(addr, &mut b).unwrap();
            b
        }
    }

    #[test]
    fn config_features_and_queues() {
        let net = Net::new(Fake::default(), MAC);
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
        let mut c = [0xaa; 10];
        net.read_config(0, &mut c);
        assert_eq!(
            c,
            [2, 0, 0, 0, 0, 1, 1, 0, 0, 0],
            "MAC, status LINK_UP, zeros past the end"
        );
        let mut c = [0; 4];
        net.read_config(4, &mut c);
        assert_eq!(c, [0, 1, 1, 0]);
        let f = net.features();
        assert_eq!(
            f & (feature::MAC | feature::STATUS),
            feature::MAC | feature::STATUS
        );
        assert_eq!(
            f & (feature::MRG_RXBUF | feature::GUEST_UFO | feature::HOST_UFO),
            0
        );
        assert!(!net.wants_input(), "no input before the driver is up");
    }

    #[test]
    fn activate_sets_the_backend_offloads() {
        let r = rig(feature::GUEST_CSUM | feature::GUEST_TSO4);
        assert_eq!(
            r.net.backend.offloads,
            Some(feature::GUEST_CSUM | feature::GUEST_TSO4)
        );
        assert!(r.net.wants_input());
    }

    #[test]
    fn tx_gathers_multi_descriptor_frames() {
        let mut r = rig(ALL);
        let f = frame(HDR_F_NEEDS_CSUM, GSO_TCPV4, &[7u8; 3000]);
        r.mem.write(BUF, &f[..HDR_LEN]).unwrap();
        r.mem
            .write(BUF + 0x1000, &f[HDR_LEN..HDR_LEN + 100])
            .unwrap();
        r.mem.write(BUF + 0x3000, &f[HDR_LEN + 100..]).unwrap();
        let head = r.txq.add(
            &r.mem,
            &[
                (BUF, 12, false),
                (BUF + 0x1000, 100, false),
                (BUF + 0x3000, 2900, false),
            ],
        );
        // A second frame, header and data in one buffer.
        let g = frame(0, 0, b"hello");
        r.mem.write(BUF + 0x8000, &g).unwrap();
        r.txq.add(&r.mem, &[(BUF + 0x8000, g.len() as u32, false)]);
        r.notify(TX);
        assert_eq!(r.net.backend.sent, [f, g]);
        assert_eq!(r.txq.used(&r.mem), [(u32::from(head), 0), (3, 0)]);
        assert_eq!(r.net.stats().tx_frames, 2);
        assert_eq!(r.txq.avail_event(&r.mem), 2, "notifications re-enabled");
    }

    #[test]
    fn hostile_tx_chains_are_dropped_without_harm() {
        let mut r = rig(feature::CSUM);
        let f = frame(0, 0, &[1; 64]);
        r.mem.write(BUF, &f).unwrap();
        let n = f.len() as u32;
        let chains: &[&[(u64, u32, bool)]] = &[
            &[(BUF, n, false), (BUF + 0x1000, 64, true)], // writable descriptor
            &[(u64::MAX - 8, n, false)],                  // outside RAM, wrapping
            &[(1 << 30, n, false)],                       // outside RAM
            &[(BUF, u32::MAX, false), (BUF, u32::MAX, false)], // huge lengths
            &[(BUF, 11, false)],                          // shorter than the header
            &[(BUF, 0, false)],                           // empty
            &[
                (BUF, 0x10000, false),
                (BUF, MAX_FRAME as u32 - 0x10000 + 1, false),
            ], // one byte too long
            &[(BUF + 0x4000, 12, true)],                  // only writable
        ];
        for c in chains {
            r.txq.add(&r.mem, c);
        }
        // Offloads the guest did not negotiate: TSO without HOST_TSO4, ECN without TSO.
        for (flags, gso) in [
            (0, GSO_TCPV4),
            (0, GSO_TCPV6 | GSO_ECN),
            (0, GSO_ECN),
            (0, 3),
        ] {
            let addr = BUF + 0x2000 + 0x100 * u64::from(gso);
            r.mem.write(addr, &frame(flags, gso, &[0; 8])).unwrap();
            r.txq.add(&r.mem, &[(addr, 20, false)]);
        }
        // Then a good one, exactly MAX_FRAME long over two buffers, with a partial checksum.
        r.mem
            .write(BUF + 0x20000, &frame(HDR_F_NEEDS_CSUM, 0, &[]))
            .unwrap();
        r.txq.add(
            &r.mem,
            &[
                (BUF + 0x20000, 0x10000, false),
                (BUF + 0x30000, MAX_FRAME as u32 - 0x10000, false),
            ],
        );
        r.notify(TX);
        let used = r.txq.used(&r.mem);
        assert_eq!(used.len(), chains.len() + 5);
        assert!(used.iter().all(|&(_, len)| len == 0));
        assert_eq!(r.net.backend.sent.len(), 1);
        assert_eq!(r.net.backend.sent[0].len(), MAX_FRAME);
        let s = r.net.stats();
        assert_eq!((s.tx_frames, s.tx_dropped), (1, chains.len() as u64 + 4));
    }

    #[test]
    fn rx_delivers_into_a_multi_buffer_chain() {
        let mut r = rig(ALL);
        let f = frame(HDR_F_NEEDS_CSUM, GSO_TCPV6 | GSO_ECN, &[5; 5000]);
        r.net.backend.inbox.push_back(f.clone());
        // Linux's "big packets" layout: header alone, then page-sized pieces.
        let head = r.rxq.add(
            &r.mem,
            &[
                (BUF, 12, true),
                (BUF + 0x1000, 4080, true),
                (BUF + 0x2000, 4096, true),
            ],
        );
        r.backend_ready();
        assert_eq!(r.rxq.used(&r.mem), [(u32::from(head), f.len() as u32)]);
        let mut want = f.clone();
        want[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut got = r.read(BUF, 12);
        got.extend(r.read(BUF + 0x1000, 4080));
        got.extend(r.read(BUF + 0x2000, f.len() - 4092));
        assert_eq!(got, want, "header passed through, num_buffers = 1");
        assert!(r.net.wants_input());
        assert_eq!(r.net.stats().rx_frames, 1);
    }

    #[test]
    fn a_64k_gso_frame_fits_linux_big_receive_buffers() {
        // Without MRG_RXBUF and with guest TSO, Linux posts the header alone, the rest of
        // that page, then MAX_SKB_FRAGS (17) pages: 19 descriptors.
        let mut r = rig(ALL);
        let mut bufs = vec![(BUF, 12, true), (BUF + 16, 4080, true)];
        bufs.extend((1..=17).map(|i| (BUF + 0x1000 * i, 4096, true)));
        let payload: Vec<u8> = (0..MAX_FRAME - HDR_LEN).map(|i| i as u8).collect();
        let f = frame(HDR_F_NEEDS_CSUM, GSO_TCPV4, &payload);
        r.net.backend.inbox.push_back(f.clone());
        r.rxq.add(&r.mem, &bufs);
        r.backend_ready();
        assert_eq!(r.rxq.used(&r.mem), [(0, MAX_FRAME as u32)]);
        let mut got = r.read(BUF, 12);
        got.extend(r.read(BUF + 16, MAX_FRAME - HDR_LEN));
        assert_eq!(got[HDR_LEN..], f[HDR_LEN..]);
        assert_eq!(got[..10], f[..10]);
    }

    #[test]
    fn rx_holds_one_frame_until_the_guest_posts_buffers() {
        let mut r = rig(ALL);
        for i in 0..3u8 {
            r.net.backend.inbox.push_back(frame(0, 0, &[i; 60]));
        }
        r.backend_ready();
        assert!(r.rxq.used(&r.mem).is_empty());
        assert_eq!(
            r.net.backend.recvs, 1,
            "one frame read, the others left in the backend"
        );
        assert!(!r.net.wants_input());
        assert_eq!(
            r.rxq.avail_event(&r.mem),
            0,
            "the driver is asked to notify"
        );
        // Readiness without buffers reads nothing more.
        r.backend_ready();
        assert_eq!(r.net.backend.recvs, 1);

        r.rxq.add(&r.mem, &[(BUF, 2048, true)]);
        r.notify(RX);
        assert_eq!(r.rxq.used(&r.mem), [(0, 72)]);
        assert_eq!(r.read(BUF + 12, 60), [0; 60]);
        // The second frame was read and is pending; the third is still in the backend.
        assert!(!r.net.wants_input());
        assert_eq!(r.net.backend.inbox.len(), 1);
        assert_eq!(r.rxq.avail_event(&r.mem), 1);

        r.rxq.add(&r.mem, &[(BUF + 0x1000, 2048, true)]);
        r.rxq.add(&r.mem, &[(BUF + 0x2000, 2048, true)]);
        r.notify(RX);
        assert_eq!(r.rxq.used(&r.mem), [(1, 72), (2, 72)]);
        assert_eq!(r.read(BUF + 0x2000 + 12, 60), [2; 60]);
        assert!(r.net.wants_input());
    }

    #[test]
    fn rx_drops_frames_that_do_not_fit() {
        let mut r = rig(ALL);
        r.net.backend.inbox.push_back(frame(0, 0, &[1; 100]));
        r.net.backend.inbox.push_back(frame(0, 0, &[2; 50]));
        r.rxq
            .add(&r.mem, &[(BUF, 12, true), (BUF + 0x1000, 50, true)]);
        r.rxq.add(&r.mem, &[(BUF + 0x2000, 62, true)]);
        r.backend_ready();
        assert_eq!(r.rxq.used(&r.mem), [(0, 0), (2, 62)]);
        assert_eq!(r.read(BUF + 0x2000 + 12, 50), [2; 50]);
        let s = r.net.stats();
        assert_eq!((s.rx_frames, s.rx_dropped), (1, 1));
    }

    #[test]
    fn rx_drops_runts_oversized_frames_and_unaccepted_offloads_before_taking_a_chain() {
        // The guest accepted checksum offload only.
        let mut r = rig(feature::GUEST_CSUM);
        for f in [
            vec![0; 11],                                 // shorter than the header
            vec![0; MAX_FRAME + 1],                      // did not fit the receive buffer
            frame(0, GSO_TCPV4, &[0; 100]),              // TSO the guest did not accept
            frame(HDR_F_NEEDS_CSUM, GSO_ECN, &[0; 100]), // ECN without GSO
            frame(0, 3, &[0; 100]),                      // UDP (UFO)
            frame(HDR_F_NEEDS_CSUM, 0, &[9; 100]),       // fine
        ] {
            r.net.backend.inbox.push_back(f);
        }
        r.rxq.add(&r.mem, &[(BUF, 4096, true)]);
        r.backend_ready();
        assert_eq!(r.rxq.used(&r.mem), [(0, 112)]);
        assert_eq!(r.read(BUF + 12, 100), [9; 100]);
        assert_eq!(r.net.stats().rx_dropped, 5);

        // Without GUEST_CSUM a partial checksum is refused too.
        let mut r = rig(0);
        r.net
            .backend
            .inbox
            .push_back(frame(HDR_F_NEEDS_CSUM, 0, &[0; 100]));
        r.rxq.add(&r.mem, &[(BUF, 4096, true)]);
        r.backend_ready();
        assert!(r.rxq.used(&r.mem).is_empty());
        assert_eq!(r.net.stats().rx_dropped, 1);
    }

    #[test]
    fn hostile_rx_chains_get_nothing() {
        let mut r = rig(ALL);
        let chains: &[&[(u64, u32, bool)]] = &[
            &[(BUF, 4096, false)],    // no writable buffer
            &[(1 << 30, 4096, true)], // outside RAM
            &[(u64::MAX - 100, u32::MAX, true), (BUF, u32::MAX, true)], // wraps, huge
            &[(BUF, 12, true), (0xf_ff00, 0x1000, true)], // runs off the end of RAM
        ];
        for c in chains {
            r.rxq.add(&r.mem, c);
            r.net.backend.inbox.push_back(frame(0, 0, &[3; 1000]));
        }
        r.backend_ready();
        let used = r.rxq.used(&r.mem);
        assert_eq!(used.len(), chains.len());
        assert!(used.iter().all(|&(_, len)| len == 0));
        assert_eq!(r.net.stats().rx_dropped, chains.len() as u64);
        assert!(r.net.wants_input());
    }

    #[test]
    fn rx_work_per_call_is_bounded() {
        let mut r = rig(ALL);
        for _ in 0..RX_BUDGET + 10 {
            r.net.backend.inbox.push_back(frame(0, 0, &[0; 60]));
        }
        for i in 0..256 {
            r.rxq.add(&r.mem, &[(BUF + 0x100 * i, 0x100, true)]);
        }
        r.backend_ready();
        assert_eq!(r.rxq.used(&r.mem).len(), RX_BUDGET);
        assert_eq!(r.net.backend.inbox.len(), 10);
        assert!(r.net.wants_input(), "the rest waits for the next readiness");
    }

    #[test]
    fn no_reception_before_activation_after_a_backend_error_or_across_reset() {
        let mem = VecMemory::new(0, 1 << 20);
        let mut queues = [Queue::new(QUEUE_SIZE), Queue::new(QUEUE_SIZE)];
        let mut net = Net::new(Fake::default(), MAC);
        net.backend.inbox.push_back(frame(0, 0, &[0; 60]));
        net.backend_ready(&mut queues, &mem).unwrap();
        assert_eq!(net.backend.recvs, 0, "not read before the driver is up");

        let mut r = rig(ALL);
        r.net.backend.inbox.push_back(frame(0, 0, &[0; 60]));
        r.backend_ready();
        assert!(!r.net.wants_input(), "one frame pending");
        r.net.reset();
        assert!(!r.net.wants_input());
        r.net.activate(ALL);
        assert!(r.net.wants_input(), "the pending frame went with the reset");

        r.net.backend.recv_error = Some(NetError::Io(77));
        r.backend_ready();
        assert_eq!(r.net.stats().rx_error, Some(NetError::Io(77)));
        assert!(!r.net.wants_input(), "a failed backend is not watched");
        r.net.backend.recv_error = None;
        r.backend_ready();
        assert_eq!(r.net.backend.recvs, 2, "nor read");
        r.net.reset();
        r.net.activate(ALL);
        assert!(r.net.wants_input());
    }

    #[test]
    fn an_unready_receive_queue_keeps_the_frame_and_stops_reading() {
        let mut r = rig(ALL);
        r.queues[RX].ready = false;
        r.net.backend.inbox.push_back(frame(0, 0, &[0; 60]));
        r.net.backend.inbox.push_back(frame(0, 0, &[0; 60]));
        r.backend_ready();
        assert_eq!(r.net.backend.recvs, 1);
        assert!(!r.net.wants_input());
    }

    #[test]
    fn a_corrupt_ring_fails_the_device() {
        let mut r = rig(ALL);
        r.net.backend.inbox.push_back(frame(0, 0, &[0; 60]));
        r.rxq.set_avail_idx(&r.mem, 1000);
        assert!(r.net.backend_ready(&mut r.queues, &r.mem).is_err());
        assert!(!r.net.wants_input());
        r.net.reset();
        r.net.activate(ALL);
        assert!(r.net.wants_input());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Any chains and frames: no panic, no used length beyond the chain's writable room.
        #[test]
        fn arbitrary_chains_and_frames(
            chains in proptest::collection::vec(
                (proptest::bool::ANY, proptest::collection::vec(
                    (proptest::prop_oneof![0x10000u64..0x100000, proptest::num::u64::ANY],
                     proptest::prop_oneof![0u32..0x2000, proptest::num::u32::ANY],
                     proptest::bool::ANY), 1..6)),
                0..24),
            frames in proptest::collection::vec((0usize..4000, proptest::num::u8::ANY, proptest::num::u8::ANY), 0..24),
            features in proptest::num::u64::ANY,
        ) {
            let mut r = rig(features & OFFERED);
            for (len, flags, gso) in frames {
                let mut f = vec![0u8; len];
                if len >= 2 {
                    f[0] = flags;
                    f[1] = gso;
                }
                r.net.backend.inbox.push_back(f);
            }
            let mut caps = Vec::new();
            for (tx, descs) in &chains {
                // Device-readable buffers first, as the queue insists.
                let mut d = descs.clone();
                d.sort_by_key(|b| b.2);
                if *tx {
                    r.txq.add(&r.mem, &d);
                } else {
                    caps.push(d.iter().filter(|b| b.2).map(|b| u64::from(b.1)).sum::<u64>());
                    r.rxq.add(&r.mem, &d);
                }
            }
            r.notify(TX);
            r.backend_ready();
            r.notify(RX);
            for ((_, len), cap) in r.rxq.used(&r.mem).into_iter().zip(caps) {
                proptest::prop_assert!(u64::from(len) <= cap);
            }
            proptest::prop_assert!(r.txq.used(&r.mem).iter().all(|&(_, len)| len == 0));
        }
    }
}
