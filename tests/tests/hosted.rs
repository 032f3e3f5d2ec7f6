//! Hosted mode (`vmm --kernel ... --hosted`) under real KVM (in the KVM test host by
//! default; see the crate doc): the same unmodified kernels as native mode boot in a
//! guest VM of VM0, every exit KVM does not absorb reaching the guest server task as
//! IPC. Each boot prints the guest server's count of exits-as-IPC, which the tests read.
//!
//! The kernels get `lapic=notscdeadline` as the two-vCPU native boot does: VM0's vCPU
//! and the guest's are two vCPUs of the test host's L1 KVM, where TSC-deadline timer
//! interrupts of a second vCPU were seen lost (tests/tests/boot.rs) while the test host
//! had two vCPUs; it has one now (tests/kvm-host/README.md), and the option stays as
//! the cheaper timer for a nested guest either way.

use std::time::Duration;

use integration_tests::{check_disks_and_rng, check_network, check_vsock, image, run_guest, Run};

const TIMEOUT: Duration = Duration::from_secs(600);

fn hosted(kernel: &str, initrd: &str, args: &str) -> String {
    format!(
        "vmm --hosted --kernel {} --initrd {} {args}",
        image(kernel),
        image(initrd)
    )
}

/// The minimal kernel hosted with 64 MiB, the vmm options `args`, and `script` run as
/// one shell command by the guest's init.
fn minimal_running(args: &str, script: &str) -> String {
    hosted(
        "minimal/bzImage",
        "minimal/initramfs.cpio.gz",
        &format!(
            "--memory 64M {args} --cmdline 'console=ttyS0 panic=-1 pci=off quiet \
             lapic=notscdeadline -- \"{script}\"'"
        ),
    )
}

/// The checks every device test makes after its own: no vmm error, `n` device tasks
/// (returned), and no MMIO exit at the guest server (the tasks had them all).
fn served_by_device_tasks(run: &Run, n: usize) -> Vec<Task> {
    assert!(!run.output.contains("vmm: error"), "{}", run.output);
    let tasks = device_tasks(run);
    assert_eq!(tasks.len(), n, "device tasks:\n{}", run.output);
    let (_, _, server_mmio) = exits(run);
    assert_eq!(
        server_mmio, 0,
        "MMIO exits reached the guest server:\n{}",
        run.output
    );
    tasks
}

fn lines(output: &str) -> Vec<&str> {
    output.lines().map(|l| l.trim_end_matches('\r')).collect()
}

/// The guest server's closing line: (exits as IPC, of which to COM1, MMIO).
fn exits(run: &Run) -> (u64, u64, u64) {
    let line = lines(&run.output)
        .into_iter()
        .find(|l| l.starts_with("guest server: ") && l.contains(" exits as IPC"))
        .unwrap_or_else(|| panic!("no exit count from the guest server:\n{}", run.output))
        .to_string();
    let num = |after: &str| -> u64 {
        let rest = &line[line.find(after).expect(after) + after.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {after:?} in {line:?}"))
    };
    let total = num("guest server: ");
    let com1 = num("of which ");
    let mmio = line
        .rsplit(", ")
        .next()
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("MMIO count");
    (total, com1, mmio)
}

#[test]
fn minimal_kernel_boots_hosted_and_passes_out_the_command_status() {
    let run = run_guest(
        &hosted(
            "minimal/bzImage",
            "minimal/initramfs.cpio.gz",
            "--memory 64M --cmdline 'console=ttyS0 panic=-1 pci=off lapic=notscdeadline -- \
             echo memkb=$(awk \"/MemTotal/ {print \\$2}\" /proc/meminfo); echo result=$((6*7)); exit 42'",
        ),
        TIMEOUT,
    );
    run.expect("mk: microkernel starting")
        .expect("VMM-GUEST-READY cpus=1")
        .expect_status(42);
    let l = lines(&run.output);
    assert!(l.contains(&"result=42"), "the command ran:\n{}", run.output);
    // the guest's RAM is the 64 MiB the guest server mapped (less what the kernel keeps)
    let kib: u64 = run.value("memkb").parse().expect("MemTotal in kB");
    assert!(
        (40 << 10..64 << 10).contains(&kib),
        "MemTotal {kib} kB of 64 MiB:\n{}",
        run.output
    );
    let (total, com1, mmio) = exits(&run);
    assert!(
        com1 > 100 && total > com1 && mmio == 0,
        "console output and probing went through the guest server as IPC: \
         {total} exits, {com1} to COM1, {mmio} MMIO"
    );
    // (a repeated exit announcement is reported, and is not a complaint)
    let complaints = lines(&run.output)
        .into_iter()
        .filter(|l| l.contains("vmm: ") && !l.contains("exit announcements repeated"))
        .count();
    assert_eq!(complaints, 0, "no vmm complaints:\n{}", run.output);
    eprintln!(
        "minimal kernel hosted: {:?} from vmm start to exit, {total} exits as IPC",
        run.elapsed
    );
}

#[test]
fn stock_debian_cloud_kernel_boots_hosted_through_acpi_with_kvmclock() {
    let run = run_guest(
        &hosted(
            "cloud/vmlinuz",
            "cloud/initramfs.cpio.gz",
            "--memory 128M --cmdline 'console=ttyS0 panic=-1 pci=off quiet lapic=notscdeadline -- \
             ls /sys/bus/acpi/devices; cat /sys/devices/system/clocksource/clocksource0/current_clocksource; \
             exit 7'",
        ),
        TIMEOUT,
    );
    run.expect("VMM-GUEST-READY cpus=1").expect_status(7);
    // the same DSDT as native: the UART and pvpanic, found through ACPI
    run.expect("PNP0501:00").expect("QEMU0001:00");
    assert!(
        lines(&run.output).contains(&"kvm-clock"),
        "kvmclock is the clocksource:\n{}",
        run.output
    );
    let (total, _, _) = exits(&run);
    eprintln!(
        "cloud kernel hosted: {:?} from vmm start to exit, {total} exits as IPC",
        run.elapsed
    );
}

#[test]
fn a_guest_poking_outside_its_ram_reads_ones_and_cannot_reach_vm0() {
    // The guest writes beyond its 64 MiB of RAM (guest-physical 64..72 MiB: at those
    // VM0-physical addresses lies the microkernel's heap) and into the unassigned MMIO
    // window, then reads back; each access must be an MMIO exit answered with all
    // ones, and the microkernel and the guest server must go on to deliver the
    // power-off and the exit status.
    let script = "for a in 0x4000000 0x4100000 0x47ff000 0xd0000000 0xfe000000; do \
                  devmem $a 32 0x5a5a5a5a; echo poke $a=$(devmem $a 32); done; exit 5";
    let run = run_guest(
        &hosted(
            "minimal/bzImage",
            "minimal/initramfs.cpio.gz",
            &format!(
                "--memory 64M --no-rng --cmdline 'console=ttyS0 panic=-1 pci=off quiet \
                 lapic=notscdeadline -- {script}'"
            ),
        ),
        TIMEOUT,
    );
    run.expect("VMM-GUEST-READY cpus=1").expect_status(5);
    for a in [
        "0x4000000",
        "0x4100000",
        "0x47ff000",
        "0xd0000000",
        "0xfe000000",
    ] {
        assert!(
            lines(&run.output).contains(&format!("poke {a}=0xFFFFFFFF").as_str()),
            "{a} reads all ones after the write:\n{}",
            run.output
        );
    }
    let (_, _, mmio) = exits(&run);
    assert!(
        mmio >= 10,
        "each poke was an MMIO exit to the guest server: {mmio}"
    );
}

/// A device task's closing line.
#[derive(Clone, Copy, Debug)]
struct Task {
    /// Exits as IPC.
    exits: u64,
    /// Queue notifications, and those of them that came as interrupts (paired).
    notifies: u64,
    by_irq: u64,
    /// Requests to VM0's device.
    requests: u64,
    /// Guest interrupts raised outside exit replies (doorbell or `guest_interrupt`).
    interrupts: u64,
}

/// The device tasks' closing lines, in order.
fn device_tasks(run: &Run) -> Vec<Task> {
    lines(&run.output)
        .into_iter()
        .filter(|l| l.starts_with("device task ") && l.contains(" exits as IPC"))
        .map(|l| {
            // "device task I: N exits as IPC, K queue notifications (P as interrupts),
            // R requests to VM0's device, Q interrupts outside replies"
            let n: Vec<u64> = l
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            assert_eq!(n.len(), 7, "{l}");
            Task {
                exits: n[1],
                notifies: n[2],
                by_irq: n[3],
                requests: n[4],
                interrupts: n[6],
            }
        })
        .collect()
}

#[test]
fn disks_and_rng_are_served_by_device_tasks_in_vm0() {
    let run = check_disks_and_rng("hosted-disks", &minimal_running);
    // every device had its task (three disks and the rng): the guest's MMIO exits went
    // there, not to the server, and each task drove VM0's device behind it
    let tasks = served_by_device_tasks(&run, 4);
    for (i, t) in tasks.iter().enumerate() {
        assert!(
            t.exits > 20 && t.notifies > 0 && t.requests > 0,
            "device task {i}: {t:?}"
        );
        // eventfd pairing: every notification came as an interrupt, none as an exit,
        // and the task rang the guest's doorbell for what it completed
        assert!(
            t.by_irq == t.notifies && t.interrupts > 0,
            "device task {i}: {t:?}"
        );
    }
    eprintln!("hosted devices: {tasks:?}");
}

#[test]
fn network_is_served_by_a_device_task_in_vm0() {
    let run = check_network("hosted-net", &|net, script| {
        minimal_running(&format!("--no-rng {net}"), script)
    });
    let t = served_by_device_tasks(&run, 1)[0];
    // 4 MiB each way is thousands of frames through VM0's device; every notification
    // came as an interrupt (eventfd pairing), and frames the task moved into the guest
    // outside an exit were announced by the doorbell — at least the first of the
    // host → guest stream, which finds the guest idle in `nc`'s read
    assert!(
        t.exits > 20
            && t.notifies > 0
            && t.by_irq == t.notifies
            && t.requests > 2_000
            && t.interrupts > 0,
        "network device task: {t:?}"
    );
    eprintln!("hosted network: {t:?}");
}

#[test]
fn vsock_is_served_by_a_device_task_in_vm0() {
    let run = check_vsock("hosted-vsock", &|vsock, script| {
        minimal_running(&format!("--no-rng {vsock}"), script)
    });
    // both connections' packets went through VM0's vsock device
    let t = served_by_device_tasks(&run, 1)[0];
    assert!(
        t.notifies > 0 && t.by_irq == t.notifies && t.requests >= 8,
        "vsock device task: {t:?}"
    );
}

#[test]
fn a_device_task_that_faults_is_restarted_and_no_acknowledged_write_is_lost() {
    // With eventfd pairing (the default) the crashes strike in the task's handling of a
    // notification interrupt; the guest waits for its completion interrupt, which the
    // new task raises after it has run the queues.
    check_restart("hosted-restart", "");
}

#[test]
fn a_device_task_that_dies_in_an_exit_is_restarted_and_the_exit_is_answered() {
    // Without pairing every notification is an exit: the crashes strike while the
    // guest's vCPU waits in that exit, which the kernel raises again to the new task.
    check_restart("hosted-restart-exits", "--no-eventfd-pairing");
}

/// The guest writes 8 MiB of its own random data to vda, 1 MiB per dd with O_DIRECT and
/// fsync, and before three of the eight it arms a crash of the disk's device task
/// (test-only register 0xf00 of the window, `--test-device-faults`): at the next queue
/// notification before the model sees it, in the backend after VM0's disk did the
/// request, and after the buffers were used but before the guest was told. Then the
/// rng's task crashes in its backend with an exception (`ud2`) rather than a page
/// fault: the kernel sends that to the task's supervisor, not its pager. Each time the root restarts the task and the
/// guest goes on: every write that completed is in the file, and reads through the new
/// task see it.
fn check_restart(scratch: &str, flags: &str) {
    const MIB: usize = 1 << 20;
    let (dir, rel) = integration_tests::scratch_dir(scratch);
    std::fs::write(dir.join("w.img"), vec![0u8; 16 * MIB]).unwrap();
    let script = "dd if=/dev/urandom of=/tmp/p bs=1M count=8 2>/dev/null; \
        echo W=$(sha256sum </tmp/p); \
        for i in 0 1 2 3 4 5 6 7; do \
          case $i in 1) devmem 0xd0000f00 32 1;; 3) devmem 0xd0000f00 32 2;; 5) devmem 0xd0000f00 32 3;; esac; \
          dd if=/tmp/p of=/dev/vda bs=64k count=16 skip=$((i*16)) seek=$((i*16)) \
             oflag=direct conv=fsync,notrunc 2>/dev/null || echo WFAIL=$i; \
        done; echo WRITE=done; \
        echo R=$(dd if=/dev/vda bs=1M count=8 iflag=direct 2>/dev/null | sha256sum); \
        devmem 0xd0001f00 32 18; \
        echo RNGBYTES=$(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c); \
        echo DONE=1";
    let run = run_guest(
        &minimal_running(
            &format!("--disk {rel}/w.img --test-device-faults {flags}"),
            script,
        ),
        TIMEOUT,
    );
    run.expect("DONE=1").expect_status(0);
    let l = lines(&run.output);
    assert!(
        !l.iter().any(|l| l.starts_with("WFAIL=")),
        "every write succeeded:\n{}",
        run.output
    );
    // the crashes happened where they were armed, and each was a restart
    for point in ["1", "2", "3", "18"] {
        assert!(
            l.contains(&format!("device task: injected fault at point {point}").as_str()),
            "no crash at point {point}:\n{}",
            run.output
        );
    }
    let restarts = |i: u64| {
        l.iter()
            .filter(|l| {
                l.starts_with(&format!("root: device task {i} (thread "))
                    && l.contains("faulted; restarted as thread")
            })
            .count()
    };
    assert_eq!(
        (restarts(0), restarts(1)),
        (3, 1),
        "three disk restarts, one rng restart:\n{}",
        run.output
    );
    let restored = l
        .iter()
        .filter(|l| l.ends_with(": restarted, setup restored"))
        .count();
    assert_eq!(restored, 4, "{}", run.output);
    // three page faults went to the pager, which reported them; the #UD (vector 6)
    // went to the supervisor directly
    let reported = l
        .iter()
        .filter(|l| {
            l.starts_with("pager: no page for ") && l.ends_with("reported to its supervisor")
        })
        .count();
    assert_eq!(reported, 3, "{}", run.output);
    assert!(
        l.iter()
            .any(|l| l.starts_with("root: thread ") && l.contains(" raised exception 6 ")),
        "{}",
        run.output
    );
    // no acknowledged write lost: the file holds all of it, and the new task reads it
    let written = std::fs::read(dir.join("w.img")).unwrap();
    assert_eq!(
        integration_tests::sha256(&written[..8 * MIB]),
        run.value("W"),
        "the file holds what the guest wrote"
    );
    assert_eq!(
        run.value("R"),
        run.value("W"),
        "read back through the restarted task"
    );
    assert!(
        written[8 * MIB..].iter().all(|&b| b == 0),
        "nothing else written"
    );
    assert_eq!(run.value("RNGBYTES"), "256", "the restarted rng serves");
    // the last instances served their notifications the configured way
    let tasks = device_tasks(&run);
    assert_eq!(tasks.len(), 2, "{}", run.output);
    for t in &tasks {
        let by_irq = if flags.is_empty() { t.notifies } else { 0 };
        assert!(
            t.notifies > 0 && t.by_irq == by_irq,
            "{tasks:?} with {flags:?}"
        );
    }
    assert!(!run.output.contains("vmm: error"), "{}", run.output);
    for l in l.iter().filter(|l| l.starts_with("root: device task")) {
        eprintln!("{l}");
    }
    eprintln!(
        "four device-task restarts (flags {flags:?}) in {:?} from vmm start to exit",
        run.elapsed
    );
    let _ = std::fs::remove_dir_all(&dir);
}
