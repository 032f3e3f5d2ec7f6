//! Bad input gets a clear message and a non-zero exit, never a panic. These checks
//! happen before a guest runs, so they run directly on this machine.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use integration_tests::{build_vmm, image, root, run_vmm_here, Run};

fn scratch(name: &str) -> PathBuf {
    let dir = root().join("target/test-scratch");
    fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn fails_with(run: &Run, status: i32, message: &str) {
    run.expect(message).expect_status(status);
    assert!(
        !run.output.contains("panicked at"),
        "the vmm panicked:\n{}",
        run.output
    );
}

#[test]
fn missing_kernel() {
    let run = run_vmm_here(&["--kernel", "/nonexistent/bzImage"]);
    fails_with(
        &run,
        1,
        "cannot open kernel image '/nonexistent/bzImage': No such file or directory",
    );
}

#[test]
fn unreadable_kernel_is_a_directory() {
    let run = run_vmm_here(&["--kernel", "/"]);
    assert_eq!(run.status, Some(1), "{}", run.output);
    run.expect("vmm: error: ").expect("'/'");
}

#[test]
fn a_file_that_is_no_kernel() {
    let run = run_vmm_here(&["--kernel", "Cargo.toml"]);
    fails_with(&run, 1, "'Cargo.toml' is not a Linux kernel");
}

#[test]
fn truncated_bzimage() {
    let full = fs::read(root().join(image("minimal/bzImage"))).unwrap();
    let cut = scratch("truncated-bzImage");
    fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let run = run_vmm_here(&["--kernel", cut.to_str().unwrap()]);
    fails_with(&run, 1, "is truncated");
}

#[test]
fn missing_initrd() {
    let run = run_vmm_here(&[
        "--kernel",
        &image("minimal/bzImage"),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    fails_with(&run, 1, "cannot open initrd '/nonexistent/initrd'");
}

#[test]
fn initrd_larger_than_guest_memory() {
    let big = scratch("big-initrd");
    let f = fs::File::create(&big).unwrap();
    f.set_len(200 << 20).unwrap(); // sparse: costs no disk
    let run = run_vmm_here(&[
        "--kernel",
        &image("minimal/bzImage"),
        "--initrd",
        big.to_str().unwrap(),
        "--memory",
        "64M",
    ]);
    fails_with(&run, 1, "does not fit in guest memory");
}

#[test]
fn memory_too_small_too_large_or_malformed() {
    let k = image("minimal/bzImage");
    fails_with(
        &run_vmm_here(&["--kernel", &k, "--memory", "1M"]),
        1,
        "too small",
    );
    fails_with(
        &run_vmm_here(&["--kernel", &k, "--memory", "64T"]),
        1,
        "more than this host's",
    );
    fails_with(
        &run_vmm_here(&["--kernel", &k, "--memory", "lots"]),
        2,
        "is not a size",
    );
}

#[test]
fn too_many_words_for_init() {
    let k = image("minimal/bzImage");
    let cmdline = format!("console=ttyS0 -- {}", "echo ".repeat(40));
    fails_with(
        &run_vmm_here(&["--kernel", &k, "--cmdline", &cmdline]),
        1,
        "Linux accepts at most 31",
    );
}

#[test]
fn fault_injection_is_only_for_hosted_guests() {
    let k = image("minimal/bzImage");
    fails_with(
        &run_vmm_here(&["--kernel", &k, "--test-device-faults"]),
        2,
        "--hosted",
    );
}

#[test]
fn cpu_count_zero_or_beyond_kvm() {
    let k = image("minimal/bzImage");
    fails_with(&run_vmm_here(&["--kernel", &k, "--cpus", "0"]), 2, "--cpus");
    fails_with(
        &run_vmm_here(&["--kernel", &k, "--cpus", "255"]),
        1,
        "allows at most",
    );
}

/// Run `script` under `unshare FLAGS` with `$VMM` and `$KERNEL` set to copies of the
/// binary and kernel in a world-readable directory, so that as `nobody` (`$AS_NOBODY`)
/// the only thing denied is what the test sets up, wherever the checkout lives.
fn isolated(unshare: &str, script: &str) -> Run {
    use std::os::unix::fs::PermissionsExt;
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("vmm-isolated-{}-{n}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let (vmm, kernel) = (dir.join("vmm"), dir.join("bzImage"));
    fs::copy(build_vmm(), &vmm).unwrap();
    fs::copy(root().join(image("minimal/bzImage")), &kernel).unwrap();
    fs::set_permissions(&vmm, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&kernel, fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("unshare")
        .args([unshare, "sh", "-c", script])
        .env("VMM", &vmm)
        .env("KERNEL", &kernel)
        .env(
            "AS_NOBODY",
            "setpriv --reuid=65534 --regid=65534 --clear-groups",
        )
        .output()
        .expect("run unshare");
    fs::remove_dir_all(&dir).unwrap();
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Run {
        status: out.status.code(),
        output,
        elapsed: Default::default(),
    }
}

/// The vmm in a private mount namespace where /dev is an empty tmpfs, plus `setup`.
fn without_dev_kvm(setup: &str, as_nobody: bool) -> Run {
    let exec = if as_nobody { "$AS_NOBODY" } else { "" };
    isolated(
        "-m",
        &format!("mount -t tmpfs tmpfs /dev && {setup} exec {exec} \"$VMM\" --kernel \"$KERNEL\""),
    )
}

#[test]
fn dev_kvm_missing_says_how_to_fix_it() {
    let run = without_dev_kvm("", false);
    fails_with(&run, 1, "cannot open /dev/kvm: No such file or directory");
    run.expect("tests/kvm-host/run");
}

#[test]
fn dev_kvm_not_accessible_says_how_to_fix_it() {
    let run = without_dev_kvm("mknod -m 600 /dev/kvm c 10 232 &&", true);
    fails_with(&run, 1, "cannot open /dev/kvm: Permission denied");
    run.expect("kvm' group");
}

#[test]
fn disk_image_missing_or_not_a_file() {
    let kernel = image("minimal/bzImage");
    let run = run_vmm_here(&["--kernel", &kernel, "--disk", "/nonexistent/disk.img"]);
    fails_with(
        &run,
        1,
        "--disk /nonexistent/disk.img: No such file or directory",
    );
    let run = run_vmm_here(&["--kernel", &kernel, "--disk", "/"]);
    fails_with(&run, 1, "--disk /:");
    let run = run_vmm_here(&["--kernel", &kernel, "--disk", "/dev/null,readonly=on"]);
    fails_with(&run, 1, "not a regular file or block device");
}

#[test]
fn disk_image_the_user_may_not_write() {
    // Root may write anything; the check is for everyone else.
    let img = scratch("ro-for-nobody.img");
    fs::write(&img, vec![0u8; 4096]).unwrap();
    let run = isolated(
        "-m",
        &format!(
            "cp {img} /tmp/d.img && chmod 644 /tmp/d.img && exec $AS_NOBODY \"$VMM\" --kernel \"$KERNEL\" --disk /tmp/d.img",
            img = img.display()
        ),
    );
    fails_with(&run, 1, "--disk /tmp/d.img: Permission denied");
    run.expect("readonly=on");
}

#[test]
fn tap_that_does_not_exist() {
    // In a network namespace of its own, so nothing on this machine is touched.
    let run = isolated(
        "-n",
        "exec \"$VMM\" --kernel \"$KERNEL\" --net tap=vmmnosuch0",
    );
    fails_with(&run, 1, "--net tap=vmmnosuch0: ");
    run.expect("ip tuntap add");
    let run = isolated("-n", "exec \"$VMM\" --kernel \"$KERNEL\" --net tap=lo");
    fails_with(&run, 1, "--net tap=lo: ");
    let run = isolated(
        "-n",
        "exec \"$VMM\" --kernel \"$KERNEL\" --net tap=a-name-longer-than-15",
    );
    fails_with(&run, 1, "--net tap=a-name-longer-than-15: ");
}

#[test]
fn tap_the_user_may_not_open() {
    let run = isolated(
        "-n",
        "ip tuntap add vmmtap0 mode tap && exec $AS_NOBODY \"$VMM\" --kernel \"$KERNEL\" --net tap=vmmtap0",
    );
    fails_with(&run, 1, "--net tap=vmmtap0: ");
    assert!(
        run.output.to_lowercase().contains("permission"),
        "{}",
        run.output
    );
}

#[test]
fn vsock_socket_path_in_use_or_unusable() {
    let kernel = image("minimal/bzImage");
    let sock = scratch("in-use.sock");
    fs::write(&sock, b"").unwrap();
    let spec = format!("cid=3,socket={}", sock.display());
    let run = run_vmm_here(&["--kernel", &kernel, "--vsock", &spec]);
    fails_with(&run, 1, &format!("--vsock socket={}", sock.display()));
    assert!(sock.exists(), "someone else's file is left alone");
    let run = run_vmm_here(&[
        "--kernel",
        &kernel,
        "--vsock",
        "cid=3,socket=/nonexistent/dir/v.sock",
    ]);
    fails_with(&run, 1, "--vsock socket=/nonexistent/dir/v.sock");
}

#[test]
fn malformed_device_options_are_usage_errors() {
    let kernel = image("minimal/bzImage");
    for args in [
        ["--disk", "d.img,readonly=maybe"],
        ["--disk", "d.img,cache=none"],
        ["--net", "mac=02:00:00:00:00:01"],
        ["--net", "tap=t0,mac=zz"],
        ["--vsock", "cid=2,socket=/tmp/x"],
        ["--vsock", "socket=/tmp/x"],
    ] {
        let run = run_vmm_here(&["--kernel", &kernel, args[0], args[1]]);
        assert_eq!(run.status, Some(2), "{args:?}: {}", run.output);
        run.expect(args[0]);
    }
}

#[test]
fn hosted_mode_refuses_what_it_cannot_run_before_booting() {
    let kernel = image("minimal/bzImage");
    let disk = scratch("hosted-refusal.img");
    fs::write(&disk, vec![0u8; 4096]).unwrap();
    let disk = disk.display().to_string();
    let hosted = |extra: &[&str]| {
        let mut args = vec!["--kernel", kernel.as_str(), "--hosted"];
        args.extend_from_slice(extra);
        run_vmm_here(&args)
    };
    fails_with(
        &hosted(&["--cpus", "2"]),
        1,
        "--cpus above 1 is not available with --hosted yet",
    );
    fails_with(&hosted(&["--memory", "256M"]), 1, "at most 128 MiB");
    let d = disk.as_str();
    let five = ["--disk", d, "--disk", d, "--disk", d, "--disk", d];
    fails_with(
        &hosted(&five),
        1,
        "5 virtio devices with --hosted: at most 4",
    );
    fails_with(
        &hosted(&["--memory", "128M", "--disk", d, "--disk", d, "--disk", d]),
        1,
        "at most 105 MiB with 4 devices",
    );
}
