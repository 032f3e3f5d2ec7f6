//! A Linux tap device as the virtio-net backend.
//!
//! `Tap::open` attaches to the tap interface of that name through `/dev/net/tun`
//! (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, 12-byte vnet headers, non-blocking), so frames
//! read and written carry the `virtio_net_hdr_v1` the device passes through. The tap
//! normally exists already (`ip tuntap add NAME mode tap user USER`); if it does not and
//! the caller has `CAP_NET_ADMIN`, the kernel creates a transient one that disappears
//! with the vmm. Offloads start off and follow the guest's features (`TUNSETOFFLOAD`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use crate::host::HostFds;
use crate::virtio::net::{feature, Net, NetBackend, NetError};

const TUN_PATH: &str = "/dev/net/tun";
/// `virtio_net_hdr_v1`, as `VERSION_1` is always negotiated.
const VNET_HDR_LEN: libc::c_int = 12;

/// Why a tap could not be opened. The messages are meant for the user, who set the name.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name is longer than {} bytes", libc::IFNAMSIZ - 1)]
    NameTooLong,
    #[error("tap name is empty, '.', '..', or contains '/', ':', '%', whitespace or NUL")]
    InvalidName,
    #[error("cannot open {TUN_PATH} (is the tun module loaded?): {0}")]
    NoTunDevice(io::Error),
    #[error("no such tap interface (create it first: `ip tuntap add NAME mode tap user USER`)")]
    NotFound,
    #[error("permission denied: {0}")]
    PermissionDenied(&'static str),
    #[error("the interface exists but is not a single-queue tap")]
    NotATap,
    #[error("the tap is already in use by another process")]
    Busy,
    #[error("{op}: {source}")]
    Setup { op: &'static str, source: io::Error },
}

/// An open tap queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_error(op: &'static str) -> TapError {
    TapError::Setup {
        op,
        source: io::Error::last_os_error(),
    }
}

/// The name as `ifr_name`, checked the way the kernel's `dev_valid_name` does (and
/// without '%', which would make the kernel pick a new name).
fn ifname(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], TapError> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(TapError::NameTooLong);
    }
    let bad = |c: char| matches!(c, '/' | ':' | '%' | '\0') || c.is_whitespace();
    if name.is_empty() || name == "." || name == ".." || name.contains(bad) {
        return Err(TapError::InvalidName);
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        *o = b as libc::c_char;
    }
    Ok(out)
}

/// Whether an interface of this (NUL-terminated) name exists in our network namespace.
fn interface_exists(ifr_name: &[libc::c_char; libc::IFNAMSIZ]) -> bool {
    // SAFETY: `ifr_name` is NUL-terminated (`ifname` leaves at least one trailing zero).
    unsafe { libc::if_nametoindex(ifr_name.as_ptr()) != 0 }
}

impl Tap {
    /// Attach to the existing tap interface `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        // TUNSETIFF would create a missing tap (as root) that nobody configured: refuse.
        if !interface_exists(&ifname(name)?) {
            return Err(TapError::NotFound);
        }
        Tap::attach(name)
    }

    /// Attach to tap `name`, creating a transient one if it is missing and we may.
    fn attach(name: &str) -> Result<Tap, TapError> {
        let ifr_name = ifname(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => {
                    TapError::PermissionDenied("cannot open /dev/net/tun")
                }
                _ => TapError::NoTunDevice(e),
            })?;
        let fd = file.as_raw_fd();

        // SAFETY: `ifreq` is plain data (integers, arrays, a union of such and a pointer
        // that TUNSETIFF does not use); all zeros is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = ifr_name;
        ifr.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which outlives the call.
        if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr) } < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied(
                    "the tap belongs to another user or group (`ip tuntap add NAME mode tap user USER` makes it yours)",
                ),
                Some(libc::EINVAL) if interface_exists(&ifr_name) => TapError::NotATap,
                Some(libc::EBUSY) => TapError::Busy,
                _ => TapError::Setup {
                    op: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let hdr_len = VNET_HDR_LEN;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(ioctl_error("TUNSETVNETHDRSZ"));
        }
        let mut tap = Tap {
            file,
            name: name.to_owned(),
        };
        // A persistent tap keeps the offloads its last user set: start from none.
        tap.set_offloads(0)
            .map_err(|_| ioctl_error("TUNSETOFFLOAD"))?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn net_error(e: &io::Error) -> NetError {
    NetError::Io(e.raw_os_error().unwrap_or(libc::EIO))
}

/// `TUNSETOFFLOAD` flags for what the guest accepts. The kernel refuses TSO without
/// checksum offload and ECN without TSO, as the virtio spec does.
fn tun_offloads(guest_features: u64) -> libc::c_uint {
    let has = |bit: u64| guest_features & bit != 0;
    if !has(feature::GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(feature::GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(feature::GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(feature::GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        loop {
            // A tap takes a frame whole or not at all.
            match (&self.file).write(frame) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(net_error(&e)),
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        loop {
            match (&self.file).read(buf) {
                Ok(0) => return Err(NetError::Closed),
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(net_error(&e)),
            }
        }
    }

    fn set_offloads(&mut self, guest_features: u64) -> Result<(), NetError> {
        let flags = libc::c_ulong::from(tun_offloads(guest_features));
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is involved.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, flags) } < 0 {
            return Err(net_error(&io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// The tap is watched for input only while the device can take it (see
/// `Net::wants_input`); otherwise it is left out of the epoll set entirely, so that
/// neither pending frames nor an error condition wake the loop.
impl HostFds for Net<Tap> {
    fn fds(&self) -> Vec<(RawFd, u32)> {
        if self.wants_input() {
            vec![(self.backend().as_raw_fd(), libc::EPOLLIN as u32)]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::{HDR_LEN, MAX_FRAME};
    use crate::virtio::VirtioDevice;

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        assert!(matches!(
            Tap::open("a-name-of-16-chr"),
            Err(TapError::NameTooLong)
        ));
        for bad in ["", ".", "..", "a/b", "tap:0", "tap%d", "tap 0", "tap\0"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::InvalidName)),
                "{bad:?}"
            );
        }
        assert!(ifname("exactly15bytes_").is_ok());
    }

    #[test]
    fn offload_flags_follow_the_guest_and_the_kernel_rules() {
        use feature::*;
        assert_eq!(tun_offloads(0), 0);
        assert_eq!(
            tun_offloads(GUEST_TSO4 | GUEST_ECN),
            0,
            "TSO needs checksum offload"
        );
        assert_eq!(
            tun_offloads(GUEST_CSUM | GUEST_ECN),
            libc::TUN_F_CSUM,
            "ECN needs TSO"
        );
        assert_eq!(
            tun_offloads(GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN | HOST_TSO4 | CSUM),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
    }

    /// Opening a tap that does not exist is refused, with or without privileges.
    fn assert_missing_tap_error(name: &str) {
        let err = Tap::open(name).unwrap_err();
        assert!(matches!(err, TapError::NotFound), "{err:?}");
    }

    /// Run `root_case` as root in a fresh network namespace, on a thread of its own
    /// (namespaces and capabilities are per thread), so the host's interfaces are not
    /// touched. Not root: what a missing tap gives instead.
    fn in_private_netns(missing: &str, root_case: fn()) {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert_missing_tap_error(missing);
            return;
        }
        std::thread::spawn(move || {
            // SAFETY: unshare has no memory arguments; it moves only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                // E.g. a container without CAP_SYS_ADMIN: that is the error, and we
                // cannot run the root cases.
                let e = io::Error::last_os_error();
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                return;
            }
            root_case();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_missing_tap_or_one_owned_by_someone_else() {
        in_private_netns("vmm-no-such-0", root_cases);
    }

    /// Root, in a new network namespace.
    fn root_cases() {
        assert_missing_tap_error("vmmtest0");
        let tap = Tap::attach("vmmtest0").expect("root creates a transient tap");
        assert_eq!(tap.name(), "vmmtest0");
        // Attaching twice to a single-queue tap.
        assert!(matches!(Tap::open("vmmtest0"), Err(TapError::Busy)));
        // An interface that is not a tap.
        assert!(matches!(Tap::open("lo"), Err(TapError::NotATap)));
        // Give the tap an owner that is not us, then drop CAP_NET_ADMIN.
        // SAFETY: TUNSETOWNER takes a uid by value.
        assert_eq!(
            unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETOWNER, 4242 as libc::c_ulong) },
            0
        );
        drop_net_admin();
        assert_missing_tap_error("vmm-no-such-0");
        let err = Tap::open("vmmtest0").unwrap_err();
        assert!(matches!(err, TapError::PermissionDenied(_)), "{err:?}");
    }

    /// Clear `CAP_NET_ADMIN` from this thread's effective capabilities.
    fn drop_net_admin() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_NET_ADMIN: u32 = 12;
        let mut hdr = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget writes one header and two data structs, laid out as the kernel's.
        assert_eq!(
            unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) },
            0
        );
        data[0].effective &= !(1 << CAP_NET_ADMIN);
        // SAFETY: capset reads the same structs; the raw syscall changes only this thread.
        assert_eq!(
            unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) },
            0
        );
    }

    /// Root in a new namespace: frames go through a real tap both ways, with their vnet
    /// headers, and the device's fds follow `wants_input`.
    #[test]
    fn frames_cross_a_real_tap() {
        in_private_netns("vmm-no-such-1", round_trip);
    }

    const ETHERTYPE: [u8; 2] = [0x88, 0xb5]; // local experimental

    fn round_trip() {
        let mut tap = Tap::attach("vmmtest1").unwrap();
        tap.set_offloads(
            feature::GUEST_CSUM | feature::GUEST_TSO4 | feature::GUEST_TSO6 | feature::GUEST_ECN,
        )
        .unwrap();
        let mut buf = vec![0; MAX_FRAME];
        assert_eq!(tap.recv(&mut buf), Ok(None), "nothing yet, and no blocking");

        let ifindex = set_up("vmmtest1");
        let sock = packet_socket(ifindex);

        // Host to guest: a frame sent on the interface comes out of the tap with a header.
        let mut eth = vec![0xff; 6];
        eth.extend([2, 0, 0, 0, 0, 2]);
        eth.extend(ETHERTYPE);
        eth.extend(b"to the guest");
        // SAFETY: send reads `eth.len()` bytes from `eth`.
        let n = unsafe { libc::send(sock.as_raw_fd(), eth.as_ptr().cast(), eth.len(), 0) };
        assert_eq!(n, eth.len() as isize, "{}", io::Error::last_os_error());
        let got = wait_for(|| loop {
            match tap.recv(&mut buf).unwrap() {
                Some(n)
                    if buf
                        .get(HDR_LEN + 12..n)
                        .is_some_and(|t| t.starts_with(&ETHERTYPE)) =>
                {
                    break Some(buf[..n].to_vec())
                }
                Some(_) => continue, // the kernel's own traffic (IPv6 ND, MLD)
                None => break None,
            }
        });
        assert_eq!(got[HDR_LEN..], eth[..]);
        assert_eq!(got[..HDR_LEN], [0; HDR_LEN], "no offloads on this frame");

        // Guest to host: a frame written to the tap arrives on the interface.
        let mut out = vec![0; HDR_LEN];
        out.extend([2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
        out.extend(ETHERTYPE);
        out.extend(b"from the guest");
        tap.send(&out).unwrap();
        let got = wait_for(|| {
            let mut b = [0u8; 2048];
            loop {
                // SAFETY: recv writes at most `b.len()` bytes into `b`.
                let n = unsafe {
                    libc::recv(
                        sock.as_raw_fd(),
                        b.as_mut_ptr().cast(),
                        b.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    break None;
                }
                if b[..n as usize].ends_with(b"from the guest") {
                    break Some(b[..n as usize].to_vec());
                }
            }
        });
        assert_eq!(got[..], out[HDR_LEN..]);
        // A bad header is the tap's to refuse (an unknown GSO type).
        let mut bad = out.clone();
        bad[1] = 0x55;
        assert!(matches!(tap.send(&bad), Err(NetError::Io(_))));

        // The device watches the tap only while it can take input.
        let mut net = Net::new(tap, [2, 0, 0, 0, 0, 1]);
        assert!(net.fds().is_empty(), "not before the driver is up");
        net.activate(feature::GUEST_CSUM | feature::GUEST_TSO4);
        assert_eq!(
            net.fds(),
            [(net.backend().as_raw_fd(), libc::EPOLLIN as u32)]
        );
        assert_eq!(net.stats().offload_error, None);
        net.reset();
        assert!(net.fds().is_empty());
    }

    /// Poll `f` for up to five seconds.
    fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
        for _ in 0..500 {
            if let Some(t) = f() {
                return t;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("timed out");
    }

    /// Bring interface `name` up; returns its index.
    fn set_up(name: &str) -> libc::c_int {
        // SAFETY: socket has no memory arguments; the fd is owned by `File` below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(s >= 0);
        // SAFETY: `s` is a fresh fd nothing else owns.
        let s = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(s) };
        // SAFETY: as in `Tap::open`.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = ifname(name).unwrap();
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS/SIOCGIFINDEX read and write one `ifreq`.
        unsafe {
            assert_eq!(libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr), 0);
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            assert_eq!(libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr), 0);
            assert_eq!(libc::ioctl(s.as_raw_fd(), libc::SIOCGIFINDEX, &mut ifr), 0);
            ifr.ifr_ifru.ifru_ifindex
        }
    }

    /// A raw packet socket on interface `ifindex`, seeing our ethertype only.
    fn packet_socket(ifindex: libc::c_int) -> File {
        let proto = u16::from_be_bytes(ETHERTYPE).to_be();
        // SAFETY: socket has no memory arguments.
        let s = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        };
        assert!(s >= 0, "{}", io::Error::last_os_error());
        // SAFETY: `s` is a fresh fd nothing else owns.
        let s = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(s) };
        // SAFETY: sockaddr_ll is plain data; all zeros is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: bind reads one sockaddr_ll of the size we pass.
        let rc = unsafe {
            libc::bind(
                s.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        s
    }
}
