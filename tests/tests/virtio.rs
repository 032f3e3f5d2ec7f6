//! Virtio devices under real guests: disks backed by real files, a tap in a network
//! namespace made for the test, vsock to a host program, the entropy device. Each boot
//! checks several things; the host side checks the files and streams afterwards.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use integration_tests::{
    check_disks_and_rng, check_network, check_vsock, image, pattern, run_guest, scratch_dir,
    sha256, Run,
};

const TIMEOUT: Duration = Duration::from_secs(600);
const MIB: usize = 1 << 20;

fn minimal(args: &str) -> String {
    format!(
        "vmm --kernel {} --initrd {} --memory 256M {args}",
        image("minimal/bzImage"),
        image("minimal/initramfs.cpio.gz")
    )
}

fn scratch(test: &str) -> (PathBuf, String) {
    scratch_dir(&format!("virtio-{test}"))
}

fn value<'a>(run: &'a Run, key: &str) -> &'a str {
    run.value(key)
}

fn assert_clean(run: &Run) {
    assert!(
        !run.output.contains("panicked at"),
        "the vmm panicked:\n{}",
        run.output
    );
    assert!(
        !run.output.contains("vmm: error"),
        "vmm error:\n{}",
        run.output
    );
}

#[test]
fn disks_read_write_flush_readonly_and_rng() {
    let run = check_disks_and_rng("virtio-disks", &|devices, script| {
        minimal(&format!(
            "{devices} --cmdline 'console=ttyS0 panic=-1 pci=off quiet -- \"{script}\"'"
        ))
    });
    assert_clean(&run);
}

#[test]
fn network_through_a_tap_in_a_private_namespace() {
    let run = check_network("virtio-net", &|net, script| {
        minimal(&format!(
            "{net} --cmdline 'console=ttyS0 panic=-1 pci=off quiet -- \"{script}\"'"
        ))
    });
    assert_clean(&run);
}

#[test]
fn vsock_connects_both_ways_through_the_unix_socket() {
    let run = check_vsock("virtio-vsock", &|vsock, script| {
        minimal(&format!(
            "{vsock} --cmdline 'console=ttyS0 panic=-1 pci=off quiet -- \"{script}\"'"
        ))
    });
    assert_clean(&run);
}

#[test]
fn stock_cloud_kernel_finds_every_device_through_acpi() {
    let (dir, rel) = scratch("cloud");
    let data = pattern(4 * MIB, 99);
    fs::write(dir.join("d.img"), &data).unwrap();
    let guest = "echo R=$(dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum); \
        echo RNG=$(cat /sys/class/misc/hw_random/rng_current); \
        echo NET=$(cat /sys/class/net/eth0/address); \
        echo VSOCK=$(ls /dev/vsock); \
        echo NDEV=$(ls /sys/bus/virtio/devices | wc -l)";
    let cmd = format!(
        "host-exec ip tuntap add tapc mode tap && {}",
        format!(
            "vmm --kernel {} --initrd {} --memory 512M --disk {rel}/d.img --net tap=tapc \
             --vsock cid=7,socket=/tmp/c.sock --cmdline 'console=ttyS0 panic=-1 quiet -- \"{guest}\"'",
            image("cloud/vmlinuz"),
            image("cloud/initramfs.cpio.gz")
        )
    );
    let run = run_guest(&cmd, TIMEOUT);
    assert_clean(&run);
    run.expect_status(0);
    assert_eq!(value(&run, "R"), sha256(&data));
    assert!(
        value(&run, "RNG").starts_with("virtio_rng"),
        "{}",
        run.output
    );
    assert_eq!(value(&run, "NET"), "52:54:00:12:34:56");
    assert_eq!(value(&run, "VSOCK"), "/dev/vsock");
    assert_eq!(value(&run, "NDEV"), "4", "blk, net, vsock, rng");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_kernel_without_acpi_finds_the_devices_on_its_command_line() {
    let (dir, rel) = scratch("acpi-off");
    let data = pattern(MIB, 3);
    fs::write(dir.join("d.img"), &data).unwrap();
    let guest = "echo CMDLINE=$(grep -c virtio_mmio.device=4K@0xd0000000:5 /proc/cmdline); \
        echo R=$(dd if=/dev/vda bs=1M count=1 2>/dev/null | sha256sum); \
        echo RNG=$(cat /sys/class/misc/hw_random/rng_current); exit 7";
    let run = run_guest(
        &minimal(&format!(
            "--disk {rel}/d.img --cmdline 'console=ttyS0 panic=-1 pci=off acpi=off quiet -- \"{guest}\"'"
        )),
        TIMEOUT,
    );
    assert_clean(&run);
    run.expect_status(7);
    assert_eq!(value(&run, "CMDLINE"), "1", "{}", run.output);
    assert_eq!(value(&run, "R"), sha256(&data));
    assert!(
        value(&run, "RNG").starts_with("virtio_rng"),
        "{}",
        run.output
    );
    let _ = fs::remove_dir_all(&dir);
}
