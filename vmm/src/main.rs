//! The `vmm` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm::layout::MIN_MEMORY;
use vmm::mk::MAX_HOSTED_MEMORY;
use vmm::size::{host_memory, parse_size};
use vmm::virtio::{DeviceConfig, DiskSpec, NetSpec, VsockSpec};
use vmm::vm::{self, Outcome, VmConfig};
use vmm::VmmError;

/// Exit status when the vmm itself fails (bad input, KVM unavailable).
const EXIT_VMM_ERROR: u8 = 1;
/// Exit status when the guest crashed (triple fault, kernel panic, internal error).
const EXIT_GUEST_CRASHED: u8 = 3;

const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 pci=off";
const DEFAULT_MEMORY: u64 = 512 << 20;
const DEFAULT_HOSTED_MEMORY: u64 = 128 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "vmm",
    version,
    about = "Boot an unmodified x86_64 Linux kernel under KVM.",
    long_about = "Boot an unmodified x86_64 Linux kernel under KVM.\n\n\
        The guest's first serial port (ttyS0) is this terminal: guest output goes to stdout and \
        stdin goes to the guest. On a terminal, Ctrl-a x quits and Ctrl-a Ctrl-a sends Ctrl-a. \
        Input piped into stdin is delivered whole, as fast as the guest reads it, followed by \
        end-of-file.",
    after_help = "Exit status:\n  \
        0-255  the guest powered off or reset; the status its init wrote to port 0x501 (0 if none)\n  \
        1      the vmm could not start the guest (bad input, KVM unavailable); the reason is on stderr\n  \
        2      invalid command line\n  \
        3      the guest crashed: kernel panic, triple fault, or KVM internal error (reason and \
        registers on stderr)"
)]
struct Cli {
    /// Kernel to boot: a bzImage or an ELF vmlinux, x86_64.
    #[arg(long, value_name = "PATH", required_unless_present = "microkernel")]
    kernel: Option<PathBuf>,

    /// Boot the embedded microkernel alone in its own VM (VM0) instead of Linux.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "disks", "net", "vsock", "hosted"])]
    microkernel: bool,

    /// Hosted mode: run the guest on top of the microkernel. VM0 boots the microkernel;
    /// the guest's RAM is part of VM0's and every exit KVM does not absorb is an IPC to
    /// a guest server task in VM0. Without it (native), the vmm serves the exits itself.
    #[arg(long)]
    hosted: bool,

    /// With --microkernel: run every test task, print `PASS <name>` or `FAIL <name>` per
    /// test, exit 0 exactly when all pass.
    #[arg(long, requires = "microkernel", conflicts_with_all = ["bench_ipc", "bench_exit"])]
    selftest: bool,

    /// With --microkernel: the IPC micro-benchmark (call + reply_wait round trip between
    /// two address spaces: guest TSC cycles and ring-0 instructions per round trip).
    #[arg(long, requires = "microkernel", conflicts_with = "bench_exit")]
    bench_ipc: bool,

    /// With --microkernel: the guest-exit micro-benchmark. A tiny guest makes EXITS
    /// (default 20000) port-I/O exits, first in a plain VM answered by the vmm (native),
    /// then in a guest VM of VM0 whose exits reach a guest server task as IPC (hosted);
    /// prints guest TSC cycles per exit round trip for both and what one hosted exit costs.
    #[arg(long, requires = "microkernel", value_name = "EXITS", num_args = 0..=1,
          default_missing_value = "20000", value_parser = clap::value_parser!(u32).range(1..))]
    bench_exit: Option<u32>,

    /// Initial ramdisk (an initramfs cpio archive, optionally compressed) loaded with the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line. Words after a standalone `--` are passed to the guest's init
    /// as arguments (the guest images run them as a shell command).
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,

    /// Guest RAM: a number with an optional K, M, G or T suffix (a bare number is MiB).
    /// Default 512M; 128M (also the most) with --hosted.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    cpus: u8,

    /// A virtio-blk disk backed by a raw image file (or block device); repeatable, the
    /// guest sees vda, vdb, ... in this order. `readonly=on` refuses guest writes; `id`
    /// is the serial the guest reads (default vdN).
    #[arg(long = "disk", value_name = "PATH[,readonly=on][,id=NAME]")]
    disks: Vec<DiskSpec>,

    /// A virtio-net interface on an existing tap device (`ip tuntap add NAME mode tap`).
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Option<NetSpec>,

    /// A virtio-vsock device with guest CID N. Host programs connect to the Unix socket
    /// PATH and send `CONNECT <port>\n` to reach a guest port; guest connections to
    /// CID 2 port P go to the Unix socket `PATH_P`.
    #[arg(long, value_name = "cid=N,socket=PATH")]
    vsock: Option<VsockSpec>,

    /// Test only, with --hosted: a guest write of 1, 2 or 3 to offset 0xf00 of a virtio
    /// device's window makes its device task crash at its next queue notification
    /// (before it, in the backend, after it; plus 16: by an invalid opcode instead of a
    /// bad load), to test that VM0 restarts the task.
    #[arg(long, requires = "hosted")]
    test_device_faults: bool,

    /// With --hosted: carry the guest's queue notifications and the device tasks'
    /// interrupts as exits through the vmm instead of eventfds inside KVM (to measure
    /// what the pairing saves).
    #[arg(long, requires = "hosted")]
    no_eventfd_pairing: bool,

    /// Leave out the virtio-rng device (on by default; fed from the host's getrandom).
    #[arg(long)]
    no_rng: bool,

    /// Run without the per-thread seccomp filters (for debugging; a system call outside
    /// a thread's allow-list otherwise ends the vmm with SIGSYS). With --hosted only VM0's
    /// device thread has a filter yet; `--microkernel` mode installs none.
    #[arg(long)]
    no_seccomp: bool,
}

/// What hosted mode does not do yet, as the error the user sees.
fn check_hosted(cli: &Cli, memory: u64) -> Result<(), VmmError> {
    let no = |what: &str| {
        Err(VmmError::Config(format!(
            "{what} is not available with --hosted yet: a hosted guest has one vCPU \
             (run without --hosted for more)"
        )))
    };
    if cli.cpus > 1 {
        return no("--cpus above 1");
    }
    if memory > MAX_HOSTED_MEMORY || !memory.is_multiple_of(1 << 20) {
        return Err(VmmError::Config(format!(
            "--memory {memory} bytes with --hosted: it must be whole MiB and at most {} MiB \
             (the microkernel's mapping database holds every 4 KiB page of a hosted guest)",
            MAX_HOSTED_MEMORY >> 20
        )));
    }
    Ok(())
}

fn validate(cli: &Cli) -> Result<VmConfig, VmmError> {
    let memory = cli.memory.unwrap_or(if cli.hosted {
        DEFAULT_HOSTED_MEMORY
    } else {
        DEFAULT_MEMORY
    });
    if cli.hosted {
        check_hosted(cli, memory)?;
    }
    if memory < MIN_MEMORY {
        return Err(VmmError::Config(format!(
            "--memory {} MiB is too small: a Linux guest needs at least {} MiB",
            memory >> 20,
            MIN_MEMORY >> 20
        )));
    }
    if let Some(host) = host_memory() {
        if memory > host {
            return Err(VmmError::Config(format!(
                "--memory {} MiB is more than this host's {} MiB of RAM",
                memory >> 20,
                host >> 20
            )));
        }
    }
    let kernel = cli
        .kernel
        .clone()
        .expect("clap requires --kernel without --microkernel");
    vm::check_cmdline(&cli.cmdline)?;
    // Check the files before touching KVM, so a typo is reported as a typo.
    vmm::boot::check_kernel_file(&kernel)?;
    if let Some(initrd) = &cli.initrd {
        std::fs::File::open(initrd).map_err(|source| {
            VmmError::Boot(vmm::boot::BootError::Open {
                what: "initrd",
                path: initrd.clone(),
                source,
            })
        })?;
    }
    Ok(VmConfig {
        kernel,
        initrd: cli.initrd.clone(),
        cmdline: cli.cmdline.clone(),
        mem_size: memory,
        cpus: cli.cpus,
        devices: DeviceConfig {
            disks: cli.disks.clone(),
            net: cli.net.clone(),
            vsock: cli.vsock.clone(),
            rng: !cli.no_rng,
        },
        seccomp: !cli.no_seccomp,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = if cli.microkernel {
        let mode = match (cli.selftest, cli.bench_ipc, cli.bench_exit) {
            (true, ..) => vmm::mk::Mode::Selftest,
            (_, true, _) => vmm::mk::Mode::BenchIpc,
            (.., Some(n)) => vmm::mk::Mode::BenchExit(n),
            _ => vmm::mk::Mode::Boot,
        };
        vmm::mk::run(mode)
    } else {
        validate(&cli).and_then(|cfg| {
            if cli.hosted {
                vmm::mk::run_hosted(&cfg, cli.test_device_faults, !cli.no_eventfd_pairing)
            } else {
                vm::run(&cfg)
            }
        })
    };
    match result {
        Ok(Outcome::Stopped { status, .. }) => ExitCode::from(status),
        Ok(Outcome::UserQuit) => {
            eprintln!("\r\nvmm: quit (Ctrl-a x)");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Panicked) => {
            eprintln!("vmm: guest kernel panicked");
            ExitCode::from(EXIT_GUEST_CRASHED)
        }
        Ok(Outcome::Crashed { vcpu, reason, regs }) => {
            eprintln!("vmm: guest crashed on vCPU {vcpu}: {reason}\n{regs}");
            ExitCode::from(EXIT_GUEST_CRASHED)
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}
