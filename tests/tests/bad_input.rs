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
fn cpu_count_zero_or_beyond_kvm() {
    let k = image("minimal/bzImage");
    fails_with(&run_vmm_here(&["--kernel", &k, "--cpus", "0"]), 2, "--cpus");
    fails_with(
        &run_vmm_here(&["--kernel", &k, "--cpus", "255"]),
        1,
        "allows at most",
    );
}

/// Run the vmm in a private mount namespace where /dev is an empty tmpfs, plus `setup`.
/// The binary and kernel are copied to a world-readable directory first, so that as
/// `nobody` the only thing denied is /dev/kvm, wherever the checkout lives.
fn without_dev_kvm(setup: &str, as_nobody: bool) -> Run {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("vmm-no-kvm-{}-{as_nobody}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let (vmm, kernel) = (dir.join("vmm"), dir.join("bzImage"));
    fs::copy(build_vmm(), &vmm).unwrap();
    fs::copy(root().join(image("minimal/bzImage")), &kernel).unwrap();
    fs::set_permissions(&vmm, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&kernel, fs::Permissions::from_mode(0o644)).unwrap();
    let exec = if as_nobody {
        "setpriv --reuid=65534 --regid=65534 --clear-groups"
    } else {
        ""
    };
    let script = format!(
        "mount -t tmpfs tmpfs /dev && {setup} exec {exec} {} --kernel {}",
        vmm.display(),
        kernel.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
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
