//! Real Linux guests under real KVM (in the KVM test host by default; see the crate doc).
//! Each boot checks as much as it can.

use std::time::Duration;

use integration_tests::{image, run_guest};

const TIMEOUT: Duration = Duration::from_secs(600);

fn minimal(args: &str) -> String {
    format!(
        "vmm --kernel {} --initrd {} {args}",
        image("minimal/bzImage"),
        image("minimal/initramfs.cpio.gz")
    )
}

fn lines(output: &str) -> Vec<&str> {
    output.lines().map(|l| l.trim_end_matches('\r')).collect()
}

#[test]
fn minimal_kernel_boots_two_cpus_and_passes_out_the_command_status() {
    let run = run_guest(
        &minimal(
            "--cpus 2 --memory 256M --cmdline 'console=ttyS0 panic=-1 pci=off -- \
             echo online=$(cat /sys/devices/system/cpu/online); echo result=$((6*7)); exit 42'",
        ),
        TIMEOUT,
    );
    run.expect("VMM-GUEST-READY cpus=2").expect_status(42);
    let l = lines(&run.output);
    assert!(
        l.contains(&"online=0-1"),
        "both vCPUs online:\n{}",
        run.output
    );
    assert!(l.contains(&"result=42"), "the command ran:\n{}", run.output);
    assert!(
        !run.output.contains("vmm: "),
        "no vmm complaints:\n{}",
        run.output
    );
    eprintln!(
        "minimal kernel, 2 vCPUs: {:?} from vmm start to exit",
        run.elapsed
    );
}

#[test]
fn piped_input_reaches_the_guest_shell_without_loss_and_eof_ends_it() {
    // 300 commands piped in long before the guest's shell reads them.
    let script: String = (1..=300)
        .map(|i| format!("echo L{i}-$(({i}*3))\\n"))
        .collect();
    let run = run_guest(
        &format!(
            "printf '{script}' | {}",
            minimal("--memory 128M --cmdline 'console=ttyS0 panic=-1 pci=off quiet'")
        ),
        TIMEOUT,
    );
    run.expect("VMM-GUEST-READY cpus=1").expect_status(0);
    let l = lines(&run.output);
    let missing: Vec<usize> = (1..=300)
        .filter(|i| !l.contains(&format!("L{i}-{}", i * 3).as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "commands lost: {missing:?}\n{}",
        run.output
    );
}

#[test]
fn stock_debian_cloud_kernel_boots_through_acpi_with_kvmclock() {
    // One vCPU: with two, this boot failed in both CI runs of 2026-11-22 that reached it,
    // in ways only the test host explains — once the test host froze before the guest printed a byte,
    // once the guest triple-faulted 2.9 s into its boot — the nested-SVM trouble of two
    // L2 vCPUs in guest mode at once (tests/kvm-host/README.md). SMP boots are the
    // minimal kernel's test above (`minimal_kernel_boots_two_cpus_...`), which has
    // passed in every run. `lapic=notscdeadline`: in the KVM test host the second
    // vCPU's TSC-deadline timer interrupts were lost in 2 of 6 boots; kept as the
    // cheaper timer for a nested guest.
    let run = run_guest(
        &format!(
            "vmm --kernel {} --initrd {} --cpus 1 --memory 512M --cmdline 'console=ttyS0 panic=-1 pci=off lapic=notscdeadline -- \
             ls /sys/bus/acpi/devices; cat /sys/devices/system/clocksource/clocksource0/current_clocksource; \
             dmesg | grep -E \"ACPI: (FACP|APIC|DSDT)\"; exit 7'",
            image("cloud/vmlinuz"),
            image("cloud/initramfs.cpio.gz")
        ),
        TIMEOUT,
    );
    run.expect("VMM-GUEST-READY cpus=1").expect_status(7);
    // Discovered through the DSDT: the UART and the pvpanic device.
    run.expect("PNP0501:00").expect("QEMU0001:00");
    run.expect("ACPI: FACP")
        .expect("ACPI: APIC")
        .expect("ACPI: DSDT");
    assert!(
        lines(&run.output).contains(&"kvm-clock"),
        "kvmclock is the clocksource:\n{}",
        run.output
    );
    eprintln!(
        "cloud kernel, 2 vCPUs: {:?} from vmm start to exit",
        run.elapsed
    );
}

#[test]
fn guest_kernel_panic_ends_the_vmm_with_an_error() {
    // An init that exits makes the kernel panic ("Attempted to kill init!").
    let run = run_guest(
        &minimal("--memory 128M --cmdline 'console=ttyS0 panic=-1 pci=off rdinit=/bin/false'"),
        TIMEOUT,
    );
    run.expect("Kernel panic")
        .expect("vmm: guest kernel panicked")
        .expect_status(3);
}

#[test]
fn elf_vmlinux_boots_and_a_guest_reset_ends_the_vmm_with_status_zero() {
    let run = run_guest(
        &format!(
            "vmm --kernel {} --initrd {} --memory 128M --cmdline 'console=ttyS0 panic=-1 pci=off -- reboot -f'",
            image("minimal/vmlinux"),
            image("minimal/initramfs.cpio.gz")
        ),
        TIMEOUT,
    );
    run.expect("VMM-GUEST-READY")
        .expect("reboot: Restarting system")
        .expect_status(0);
    assert!(
        !run.output.contains("vmm: "),
        "a reset is a normal end:\n{}",
        run.output
    );
}
