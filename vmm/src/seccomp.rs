//! Seccomp filters for native mode (`vmm --kernel`): one BPF allow-list per kind of
//! thread, built with `seccompiler`. A system call outside a thread's list kills the
//! whole vmm with `SIGSYS` (`SECCOMP_RET_KILL_PROCESS`), so a compromised device model
//! or vCPU loop ends visibly instead of reaching the rest of the host. `--no-seccomp`
//! (for debugging) leaves them out.
//!
//! # When
//!
//! Everything that needs a broad set of calls — opening `/dev/kvm`, disks, the tap and
//! the vsock listener, creating the VM, memory, vCPUs, eventfds and threads — happens
//! on the main thread before any filter exists. Then each thread installs its own
//! filter first thing ([`Sandbox::enter`]); the main thread installs its own once every
//! thread is spawned; and all of them meet at a barrier, so no vCPU enters guest code,
//! and no device or console thread touches the guest, before every filter is in
//! place. No filter allows `clone`/`clone3`, `execve`, `open`/`openat` or
//! `socket` outside `AF_UNIX`; none allows executable memory (`mmap` and `mprotect`
//! are refused with `PROT_EXEC`).
//!
//! # Who gets what
//!
//! Every thread ([`ThreadKind`]) gets the *common* set, which is what the Rust runtime
//! and the statically linked glibc call on their own:
//!
//! - memory: `brk`, `mmap`/`mprotect` (never `PROT_EXEC`), `munmap`, `mremap`,
//!   `madvise` — malloc and its per-thread arenas (the stdin reader's input queue grows
//!   with `mremap`, for one), freeing, and the release of a thread's stack at its end;
//! - `futex`: std's `Mutex`/`Condvar`/`Barrier` (device, console and run state);
//! - `write`: each kind writes for its work (below), and panic messages go to stderr;
//! - `close`: whichever thread drops the last reference to an fd closes it (a vCPU's
//!   own fd when it stops, vsock streams on a device reset, the console's irqfd);
//! - thread end: `exit`, `sigaltstack` and `rt_sigprocmask` (std and glibc tearing a
//!   thread down); abort: `getpid`, `gettid`, `tgkill(…, SIGABRT)`, so a
//!   `panic = "abort"` ends the vmm with `SIGABRT` after its message, not with `SIGSYS`.
//!
//! On top of that:
//!
//! - **vCPU** (`vcpuN`, [`crate::vm`]): `ioctl` with only these requests: `KVM_RUN`;
//!   `KVM_GET_REGS`, `KVM_GET_SREGS` (crash reports); `KVM_SET_REGS`, `KVM_TRANSLATE`,
//!   `KVM_GET/SET_FPU`, `KVM_GET/SET_VCPU_EVENTS` (kvm-pvm instruction completion,
//!   [`crate::pvm`]); `TUNSETOFFLOAD` (virtio-net applies the offloads the guest
//!   accepted when its driver writes `DRIVER_OK`, a register access handled on the
//!   vCPU). `write` carries the UART's output to stdout and raises irqfds. Queue work
//!   never runs here — KVM's ioeventfds consume every `QueueNotify` for a real queue —
//!   so no disk, tap or socket call is allowed.
//! - **event loop** (`virtio`, [`crate::virtio`]): `epoll_wait`, `epoll_ctl`; `read`
//!   (ioeventfds, tap) and `write` (irqfds, tap); disks: `pread64`, `pwrite64`,
//!   `fdatasync` (flush), `fallocate` only as `PUNCH_HOLE | KEEP_SIZE` (discard); the
//!   vsock muxer: `accept4`, `socket` only `AF_UNIX` (guest connections to the host),
//!   `connect`, `recvfrom` and `sendto` (std's stream `read`, `send(MSG_NOSIGNAL)`),
//!   `shutdown`, `ioctl` only `FIONBIO` (accepted streams made non-blocking);
//!   `getrandom` for virtio-rng and for std's `HashMap` seeds.
//! - **stdin** (`stdin`, [`crate::console`]): `read` on fd 0 only; `write` raises the
//!   UART's irqfd; `clock_nanosleep` while more than 1 MiB of input waits for the guest.
//! - **main**: waits on a condvar (`futex`), then restores the terminal (`ioctl` only
//!   `TCGETS`/`TCSETS`), removes the vsock socket file (`unlink`), prints the outcome and
//!   exits (`exit_group`, which only the main thread calls).
//!
//! The lists were found by running the statically linked vmm under `strace -f` in the
//! KVM test host with every device kind (disks with flush and discard, net in a
//! namespace, vsock both ways, rng, the cloud kernel with all four), piped and terminal
//! input with `Ctrl-a x`, and each way a guest ends (exit status, reset, panic, triple
//! fault), then checked with the filters on by the integration tests.
//!
//! `vmm --microkernel` (VM0, [`crate::mk`]) runs without filters for now.

use std::collections::BTreeMap;
use std::sync::{Barrier, Mutex};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::VmmError;

/// The kinds of thread in a native-mode vmm; each has its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU: `KVM_RUN` and exit dispatch.
    Vcpu,
    /// The virtio event loop: queues and backends.
    EventLoop,
    /// The console's stdin reader.
    Stdin,
    /// The main thread, once everything runs: waits, restores the terminal, exits.
    Main,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::Stdin,
        ThreadKind::Main,
    ];

    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::EventLoop => "virtio event loop",
            ThreadKind::Stdin => "stdin reader",
            ThreadKind::Main => "main",
        }
    }
}

/// The KVM vCPU ioctls the vCPU threads use (request numbers as in `<linux/kvm.h>`).
mod kvm {
    use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_translation, kvm_vcpu_events, KVMIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// `arg` (a 32-bit argument) equals `value`.
fn arg_eq(arg: u8, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .expect("argument index is below 6")
}

/// `arg` (a 32-bit argument) has none of the bits in `mask`.
fn arg_lacks(arg: u8, mask: u64) -> SeccompCondition {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )
    .expect("argument index is below 6")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("a rule with conditions")
}

/// Allow each of `calls` whatever its arguments.
fn allow(rules: &mut Rules, calls: &[i64]) {
    for &call in calls {
        rules.insert(call, Vec::new());
    }
}

/// Allow `call` only when argument `arg` is one of `values`.
fn allow_arg(rules: &mut Rules, call: i64, arg: u8, values: &[u64]) {
    rules.insert(
        call,
        values.iter().map(|&v| rule(vec![arg_eq(arg, v)])).collect(),
    );
}

/// The rules of one thread kind: syscall number → conditions (empty: any arguments).
pub fn rules(kind: ThreadKind) -> Rules {
    let mut r = Rules::new();
    // Common: memory without PROT_EXEC.
    allow(
        &mut r,
        &[
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
        ],
    );
    let no_exec = vec![rule(vec![arg_lacks(2, libc::PROT_EXEC as u64)])];
    r.insert(libc::SYS_mmap, no_exec.clone());
    r.insert(libc::SYS_mprotect, no_exec);
    // Common: locks, output, closing, thread end and abort.
    allow(
        &mut r,
        &[
            libc::SYS_futex,
            libc::SYS_write,
            libc::SYS_close,
            libc::SYS_exit,
            libc::SYS_sigaltstack,
            libc::SYS_rt_sigprocmask,
            libc::SYS_getpid,
            libc::SYS_gettid,
        ],
    );
    allow_arg(&mut r, libc::SYS_tgkill, 2, &[libc::SIGABRT as u64]);

    match kind {
        ThreadKind::Vcpu => {
            let requests = [
                kvm::KVM_RUN(),
                kvm::KVM_GET_REGS(),
                kvm::KVM_SET_REGS(),
                kvm::KVM_GET_SREGS(),
                kvm::KVM_TRANSLATE(),
                kvm::KVM_GET_FPU(),
                kvm::KVM_SET_FPU(),
                kvm::KVM_GET_VCPU_EVENTS(),
                kvm::KVM_SET_VCPU_EVENTS(),
                libc::TUNSETOFFLOAD,
            ];
            allow_arg(&mut r, libc::SYS_ioctl, 1, &requests);
        }
        ThreadKind::EventLoop => {
            allow(
                &mut r,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_read,
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_fdatasync,
                    libc::SYS_accept4,
                    libc::SYS_connect,
                    libc::SYS_sendto,
                    libc::SYS_recvfrom,
                    libc::SYS_shutdown,
                    libc::SYS_getrandom,
                ],
            );
            let punch = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64;
            allow_arg(&mut r, libc::SYS_fallocate, 1, &[punch]);
            allow_arg(&mut r, libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
            allow_arg(&mut r, libc::SYS_ioctl, 1, &[libc::FIONBIO]);
        }
        ThreadKind::Stdin => {
            allow_arg(&mut r, libc::SYS_read, 0, &[libc::STDIN_FILENO as u64]);
            allow(&mut r, &[libc::SYS_clock_nanosleep]);
        }
        ThreadKind::Main => {
            allow_arg(&mut r, libc::SYS_ioctl, 1, &[libc::TCGETS, libc::TCSETS]);
            allow(&mut r, &[libc::SYS_unlink, libc::SYS_exit_group]);
        }
    }
    r
}

/// Compile `kind`'s filter: listed calls allowed, anything else kills the process.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, seccompiler::Error> {
    let filter = SeccompFilter::new(
        rules(kind),
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// Installs each thread's filter and holds every thread at a barrier until all have
/// theirs, so no vCPU runs guest code before the whole vmm is filtered.
pub struct Sandbox {
    /// One program per [`ThreadKind`] (in `ThreadKind::ALL` order); `None` with
    /// `--no-seccomp`.
    programs: Option<Vec<BpfProgram>>,
    barrier: Barrier,
    error: Mutex<Option<String>>,
}

impl Sandbox {
    /// Compile the filters (unless `enabled` is false) for a vmm of `threads` threads,
    /// the main thread included: each of them must call [`Sandbox::enter`] once.
    pub fn new(enabled: bool, threads: usize) -> Result<Sandbox, VmmError> {
        let programs = enabled
            .then(|| {
                ThreadKind::ALL
                    .iter()
                    .map(|&k| {
                        compile(k).map_err(|e| {
                            VmmError::Config(format!(
                                "cannot build the seccomp filter of the {} thread: {e}",
                                k.name()
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        Ok(Sandbox {
            programs,
            barrier: Barrier::new(threads),
            error: Mutex::new(None),
        })
    }

    /// Install `kind`'s filter on the calling thread, then wait until every thread has
    /// done so. False if any thread could not install its filter: the caller must then
    /// stop without touching the guest (the main thread reports [`Sandbox::error`]).
    pub fn enter(&self, kind: ThreadKind) -> bool {
        if let Some(programs) = &self.programs {
            let index = ThreadKind::ALL.iter().position(|&k| k == kind).unwrap();
            if let Err(e) = seccompiler::apply_filter(&programs[index]) {
                let mut error = self.error.lock().unwrap();
                error.get_or_insert_with(|| {
                    format!(
                        "cannot install the seccomp filter of the {} thread: {e} \
                         (--no-seccomp runs without filters)",
                        kind.name()
                    )
                });
            }
        }
        self.barrier.wait();
        self.error.lock().unwrap().is_none()
    }

    /// Why a thread could not install its filter, if one could not.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_request_numbers_match_linux() {
        assert_eq!(kvm::KVM_RUN(), 0xae80);
        assert_eq!(kvm::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(kvm::KVM_SET_REGS(), 0x4090_ae82);
        assert_eq!(kvm::KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(kvm::KVM_TRANSLATE(), 0xc018_ae85);
        assert_eq!(kvm::KVM_GET_FPU(), 0x81a0_ae8c);
        assert_eq!(kvm::KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
    }

    #[test]
    fn every_kind_compiles_and_differs() {
        let sizes: Vec<usize> = ThreadKind::ALL.iter().map(|&k| rules(k).len()).collect();
        for k in ThreadKind::ALL {
            assert!(!compile(k).unwrap().is_empty());
        }
        // Nothing that could start a program, a thread or open a file, anywhere.
        for k in ThreadKind::ALL {
            let r = rules(k);
            for call in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_ptrace,
            ] {
                assert!(!r.contains_key(&call), "{k:?} allows syscall {call}");
            }
        }
        eprintln!("syscalls allowed (vcpu, event loop, stdin, main): {sizes:?}");
    }

    /// What a forked child does after installing a filter: return 0 for success.
    type Probe = fn() -> i32;

    /// Fork a child that installs `kind`'s real filter and runs `probe`; returns how
    /// it ended: `Ok(exit status)` or `Err(signal)`.
    fn in_filtered_child(kind: ThreadKind, probe: Probe) -> Result<i32, i32> {
        // Built before fork: the child only makes system calls, no allocation.
        let program = compile(kind).unwrap();
        // SAFETY: the child calls only async-signal-safe functions (setrlimit, prctl and
        // seccomp through apply_filter, raw system calls, abort, _exit) and never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: setrlimit reads one rlimit; _exit and exit never return. The child
            // ends with `exit` (its only thread), which every filter allows, not
            // `exit_group`, which only the main thread's does.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                if seccompiler::apply_filter(&program).is_err() {
                    libc::_exit(100);
                }
                let status = probe();
                libc::syscall(libc::SYS_exit, status);
                libc::_exit(101)
            }
        }
        let mut status = 0;
        // SAFETY: waitpid writes one int; `pid` is our child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        if libc::WIFEXITED(status) {
            Ok(libc::WEXITSTATUS(status))
        } else {
            assert!(libc::WIFSIGNALED(status));
            Err(libc::WTERMSIG(status))
        }
    }

    /// 0 if `rc` is a success (not -1).
    fn ok(rc: libc::c_long) -> i32 {
        i32::from(rc == -1)
    }

    fn write_to_stderr() -> i32 {
        // SAFETY: writes zero bytes from a valid (empty) buffer.
        ok(unsafe { libc::syscall(libc::SYS_write, 2, b"".as_ptr(), 0) })
    }

    fn futex_wake() -> i32 {
        let word = 0u32;
        // SAFETY: FUTEX_WAKE on a valid, aligned word wakes nobody.
        ok(unsafe { libc::syscall(libc::SYS_futex, &word, libc::FUTEX_WAKE, 1, 0, 0, 0) })
    }

    fn unix_socket() -> i32 {
        // SAFETY: socket has no memory arguments; the fd is closed at once.
        unsafe {
            let fd = libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd >= 0 {
                libc::syscall(libc::SYS_close, fd);
            }
            ok(fd)
        }
    }

    fn inet_socket() -> i32 {
        // SAFETY: socket has no memory arguments.
        ok(unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) })
    }

    fn execve() -> i32 {
        // SAFETY: a null path; the filter stops the call before the kernel looks.
        ok(unsafe { libc::syscall(libc::SYS_execve, 0, 0, 0) })
    }

    fn exec_mapping() -> i32 {
        // SAFETY: an anonymous mapping; refused by the filter before it exists.
        ok(unsafe {
            libc::syscall(
                libc::SYS_mmap,
                0,
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        })
    }

    fn data_mapping() -> i32 {
        // SAFETY: an anonymous read/write mapping, unmapped at once.
        unsafe {
            let p = libc::syscall(
                libc::SYS_mmap,
                0,
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p != -1 {
                libc::syscall(libc::SYS_munmap, p, 4096);
            }
            ok(p)
        }
    }

    fn tty_ioctl() -> i32 {
        let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: TCGETS writes at most one termios (fails on a non-tty, which is fine).
        let _ = unsafe { libc::syscall(libc::SYS_ioctl, 0, libc::TCGETS, t.as_mut_ptr()) };
        0
    }

    fn kvm_run() -> i32 {
        // SAFETY: KVM_RUN on a bad fd takes no memory argument; it fails with EBADF.
        let _ = unsafe { libc::syscall(libc::SYS_ioctl, -1, kvm::KVM_RUN(), 0) };
        0
    }

    fn read_other_fd() -> i32 {
        let mut b = [0u8; 1];
        // SAFETY: reads at most one byte into `b`.
        let _ = unsafe { libc::syscall(libc::SYS_read, 1000, b.as_mut_ptr(), 1) };
        0
    }

    fn open_file() -> i32 {
        // SAFETY: a NUL-terminated path.
        ok(unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/etc/hostname".as_ptr(),
                libc::O_RDONLY,
            )
        })
    }

    fn spawn_thread() -> i32 {
        // SAFETY: CLONE_SIGHAND without CLONE_VM is invalid (EINVAL) even if it got through.
        ok(unsafe { libc::syscall(libc::SYS_clone, libc::CLONE_SIGHAND, 0, 0, 0, 0) })
    }

    const SIGSYS: Result<i32, i32> = Err(libc::SIGSYS);

    fn abort() -> i32 {
        // SAFETY: abort never returns.
        unsafe { libc::abort() }
    }

    #[test]
    fn a_panic_still_aborts_with_sigabrt() {
        for kind in ThreadKind::ALL {
            assert_eq!(
                in_filtered_child(kind, abort),
                Err(libc::SIGABRT),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn allowed_calls_work_under_every_filter() {
        for kind in ThreadKind::ALL {
            for (name, probe) in [
                ("write", write_to_stderr as Probe),
                ("futex", futex_wake),
                ("mmap", data_mapping),
            ] {
                assert_eq!(in_filtered_child(kind, probe), Ok(0), "{kind:?}: {name}");
            }
        }
        assert_eq!(in_filtered_child(ThreadKind::EventLoop, unix_socket), Ok(0));
        assert_eq!(in_filtered_child(ThreadKind::Main, tty_ioctl), Ok(0));
        assert_eq!(in_filtered_child(ThreadKind::Vcpu, kvm_run), Ok(0));
    }

    #[test]
    fn forbidden_calls_kill_with_sigsys() {
        for kind in ThreadKind::ALL {
            for (name, probe) in [
                ("execve", execve as Probe),
                ("mmap(PROT_EXEC)", exec_mapping),
                ("openat", open_file),
                ("clone", spawn_thread),
                ("socket(AF_INET)", inet_socket),
            ] {
                assert_eq!(in_filtered_child(kind, probe), SIGSYS, "{kind:?}: {name}");
            }
        }
        // Each kind's ioctls and reads are its own.
        assert_eq!(in_filtered_child(ThreadKind::Vcpu, tty_ioctl), SIGSYS);
        assert_eq!(in_filtered_child(ThreadKind::EventLoop, kvm_run), SIGSYS);
        assert_eq!(in_filtered_child(ThreadKind::Main, kvm_run), SIGSYS);
        assert_eq!(in_filtered_child(ThreadKind::Stdin, tty_ioctl), SIGSYS);
        assert_eq!(in_filtered_child(ThreadKind::Stdin, read_other_fd), SIGSYS);
        assert_eq!(in_filtered_child(ThreadKind::Vcpu, unix_socket), SIGSYS);
    }
}
