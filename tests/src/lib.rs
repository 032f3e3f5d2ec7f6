//! Harness for the integration tests: run a shell command that uses `vmm` where real
//! KVM can boot Linux guests, and collect its output and exit status.
//!
//! Where the command runs is chosen by `VMM_TEST_KVM`:
//! - `host` (the default): inside the KVM test host (`tests/kvm-host/run`), a QEMU TCG
//!   VM with nested AMD-V, for machines whose own KVM cannot boot Linux quickly;
//! - `local`: directly on this machine's `/dev/kvm`.
//!
//! Either way the command sees a statically linked `vmm` on `PATH` and runs in the
//! workspace root, so `guest-images/out/...` paths work. Nothing here skips: if the
//! images or KVM are missing, the test fails and says what to do.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The statically linked vmm the tests run.
pub fn vmm_binary() -> PathBuf {
    root().join("target/x86_64-unknown-linux-gnu/release/vmm")
}

/// The statically linked host end of vsock tests (`tests/src/bin/vsock-peer.rs`).
pub fn vsock_peer_binary() -> PathBuf {
    build_vmm();
    root().join("target/x86_64-unknown-linux-gnu/release/vsock-peer")
}

/// Build the static vmm (and the static test helpers) once per test process.
pub fn build_vmm() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "-p",
                "vmm",
                "-p",
                "integration-tests",
                "--bins",
                "--target",
                "x86_64-unknown-linux-gnu",
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(root())
            .status()
            .expect("run cargo to build the static vmm");
        assert!(status.success(), "building the static vmm failed");
        vmm_binary()
    })
}

/// Where the guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmMode {
    TestHost,
    Local,
}

pub fn mode() -> KvmMode {
    match std::env::var("VMM_TEST_KVM").as_deref() {
        Ok("local") => KvmMode::Local,
        Ok("host") | Err(_) => KvmMode::TestHost,
        Ok(other) => panic!("VMM_TEST_KVM={other}: expected 'host' or 'local'"),
    }
}

/// The result of one command.
#[derive(Debug)]
pub struct Run {
    pub status: Option<i32>,
    pub output: String,
    pub elapsed: Duration,
}

impl Run {
    /// Panic with the whole output unless `needle` appears in it.
    pub fn expect(&self, needle: &str) -> &Self {
        assert!(
            self.output.contains(needle),
            "expected {needle:?} in the output:\n{}",
            self.output
        );
        self
    }

    pub fn expect_status(&self, status: i32) -> &Self {
        assert_eq!(
            self.status,
            Some(status),
            "unexpected exit status; output:\n{}",
            self.output
        );
        self
    }
}

/// Guest image paths, checked to exist.
pub fn image(rel: &str) -> String {
    let p = root().join("guest-images/out").join(rel);
    assert!(
        p.exists(),
        "{} is missing: run guest-images/build.sh first",
        p.display()
    );
    format!("guest-images/out/{rel}")
}

/// Run `command` (a `sh -c` string that may call `vmm`) where KVM can boot guests.
/// Runs are serialized: the test host wants both cores.
pub fn run_guest(command: &str, timeout: Duration) -> Run {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    build_vmm();
    let start = Instant::now();
    let mut cmd = match mode() {
        KvmMode::TestHost => {
            let mut c = Command::new(root().join("tests/kvm-host/run"));
            c.args([
                "--no-build",
                "--timeout",
                &timeout.as_secs().to_string(),
                "--",
                command,
            ]);
            c
        }
        KvmMode::Local => {
            let mut c = Command::new("timeout");
            let path = format!(
                "{}:{}",
                vmm_binary().parent().unwrap().display(),
                std::env::var("PATH").unwrap_or_default()
            );
            c.args([&timeout.as_secs().to_string(), "sh", "-c", command])
                .env("PATH", path);
            c
        }
    };
    let out = cmd
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start the guest runner ({:?}): {e}", mode()));
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    let run = Run {
        status: out.status.code(),
        output,
        elapsed: start.elapsed(),
    };
    match run.status {
        Some(124) => panic!("timed out after {timeout:?}:\n{}", run.output),
        Some(125) if mode() == KvmMode::TestHost => {
            panic!("the KVM test host failed (not the test):\n{}", run.output)
        }
        _ => {}
    }
    run
}

/// Run the static vmm directly on this machine with `args` (for input checks that
/// fail before a guest starts).
pub fn run_vmm_here(args: &[&str]) -> Run {
    let start = Instant::now();
    let out = Command::new(build_vmm())
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .expect("start vmm");
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Run {
        status: out.status.code(),
        output,
        elapsed: start.elapsed(),
    }
}

/// A fresh scratch directory `target/test-scratch/NAME` (the KVM test host shares it):
/// its absolute path and its path relative to the workspace root.
pub fn scratch_dir(name: &str) -> (PathBuf, String) {
    let rel = format!("target/test-scratch/{name}");
    let dir = root().join(&rel);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    (dir, rel)
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failure can be reproduced.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of bytes in hex, by the host's `sha256sum` (the guests use busybox's).
pub fn sha256(bytes: &[u8]) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("vmm-sha-{}-{n}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new("sha256sum")
        .arg(&path)
        .output()
        .expect("run sha256sum");
    let _ = std::fs::remove_file(&path);
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .expect("sha256sum printed a hash")
        .to_string()
}

impl Run {
    /// The output's lines, without the console's carriage returns.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.output.lines().map(|l| l.trim_end_matches('\r'))
    }

    /// The first word after `KEY=` on the first line that starts with it.
    pub fn value(&self, key: &str) -> &str {
        let prefix = format!("{key}=");
        self.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {key}= line in the output:\n{}", self.output))
    }
}
