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
///
/// A test host that froze (its emulated nested SVM, tests/kvm-host/README.md) shows as
/// a timeout with not one byte of output from `command`; such a run is repeated once,
/// saying so on stderr. A command that hangs after printing anything is not repeated.
pub fn run_guest(command: &str, timeout: Duration) -> Run {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    build_vmm();
    let first = run_once(command, timeout);
    let silent = first.status == Some(124)
        && mode() == KvmMode::TestHost
        && first
            .lines()
            .all(|l| l.is_empty() || l.starts_with("kvm-host:"));
    let run = if silent {
        eprintln!(
            "run_guest: the test host printed nothing from the command in {timeout:?} \
             (a frozen test host); running it once more:\n{}",
            first.output
        );
        run_once(command, timeout)
    } else {
        first
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

fn run_once(command: &str, timeout: Duration) -> Run {
    let start = Instant::now();
    let mut cmd = match mode() {
        KvmMode::TestHost => {
            let mut c = Command::new(root().join("tests/kvm-host/run"));
            // hosted guests get a one-vCPU test host: with two, VM0 and the guest in
            // guest mode at once broke its emulated nested SVM (tests/kvm-host/README.md)
            let cpus = if command.contains("--hosted") {
                "1"
            } else {
                "2"
            };
            c.args([
                "--no-build",
                "--cpus",
                cpus,
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
    Run {
        status: out.status.code(),
        output,
        elapsed: start.elapsed(),
    }
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

/// The disk and entropy checks native and hosted mode share: three disks (the guest
/// writes 8 MiB of its own random data to `vda` with O_DIRECT and fsync, reads the
/// host's pattern from `vdb` directly and through the page cache, and cannot write to
/// the read-only `vdc`, not even after lifting its own read-only flag) and virtio-rng.
/// `command(devices, script)` is the vmm command line that runs `script` in the guest
/// with the `--disk` options `devices`. The host checks the files afterwards.
pub fn check_disks_and_rng(scratch: &str, command: &dyn Fn(&str, &str) -> String) -> Run {
    const MIB: usize = 1 << 20;
    let (dir, rel) = scratch_dir(scratch);
    // vda: the guest writes 8 MiB of its own random data; vdb: the host's pattern for
    // the guest to read; vdc: read-only, must not change.
    std::fs::write(dir.join("w.img"), vec![0u8; 16 * MIB]).unwrap();
    let host_data = pattern(8 * MIB, 0x5eed);
    std::fs::write(dir.join("r.img"), &host_data).unwrap();
    let ro_before = pattern(MIB, 7);
    std::fs::write(dir.join("ro.img"), &ro_before).unwrap();

    let script = "cat /sys/block/vda/serial; echo; \
        echo SERIAL=$(cat /sys/block/vda/serial); \
        echo CAP=$(cat /sys/block/vda/size); \
        dd if=/dev/urandom of=/tmp/p bs=1M count=8 2>/dev/null; \
        echo W=$(sha256sum </tmp/p); \
        dd if=/tmp/p of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null && echo WRITE=ok; \
        echo R=$(dd if=/dev/vdb bs=1M count=8 iflag=direct 2>/dev/null | sha256sum); \
        echo RBUF=$(sha256sum </dev/vdb); \
        dd if=/dev/zero of=/dev/vdc bs=4k count=1 oflag=direct 2>/dev/null && echo RO1=written || echo RO1=refused; \
        blockdev --setrw /dev/vdc; \
        dd if=/dev/zero of=/dev/vdc bs=4k count=1 oflag=direct 2>/dev/null && echo RO2=written || echo RO2=refused; \
        echo RNG=$(cat /sys/class/misc/hw_random/rng_current); \
        echo RNGBYTES=$(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c); \
        echo DONE=1";
    let devices =
        format!("--disk {rel}/w.img,id=wdisk --disk {rel}/r.img --disk {rel}/ro.img,readonly=on");
    let run = run_guest(&command(&devices, script), Duration::from_secs(600));
    run.expect("DONE=1").expect_status(0);

    assert_eq!(run.value("SERIAL"), "wdisk", "GET_ID");
    assert_eq!(
        run.value("CAP"),
        (16 * MIB / 512).to_string(),
        "capacity in sectors"
    );
    // Guest → file.
    assert_eq!(run.value("WRITE"), "ok");
    let written = std::fs::read(dir.join("w.img")).unwrap();
    assert_eq!(
        sha256(&written[..8 * MIB]),
        run.value("W"),
        "the file holds what the guest wrote"
    );
    assert!(
        written[8 * MIB..].iter().all(|&b| b == 0),
        "nothing beyond it changed"
    );
    // File → guest, with O_DIRECT and through the page cache.
    let want = sha256(&host_data);
    assert_eq!(run.value("R"), want, "O_DIRECT read");
    assert_eq!(run.value("RBUF"), want, "buffered read");
    // Read-only: refused by the guest's block layer, and by the device when the guest
    // lifts its own read-only flag.
    assert_eq!(run.value("RO1"), "refused");
    assert_eq!(run.value("RO2"), "refused");
    assert_eq!(
        std::fs::read(dir.join("ro.img")).unwrap(),
        ro_before,
        "read-only image unchanged"
    );
    // Entropy.
    assert!(run.value("RNG").starts_with("virtio_rng"), "{}", run.output);
    assert_eq!(run.value("RNGBYTES"), "256");
    let _ = std::fs::remove_dir_all(&dir);
    run
}

/// The network checks native and hosted mode share, through a tap in a network
/// namespace made for the test (the vmm runs inside it, the tap is not in the test
/// host's namespace): the guest sees the MAC given on the command line, pings the
/// host, and 4 MiB of random data go each way over TCP with their checksums compared.
/// `command(net, script)` is the vmm command line that runs `script` in the guest with
/// the `--net` option `net`.
pub fn check_network(scratch: &str, command: &dyn Fn(&str, &str) -> String) -> Run {
    let (dir, rel) = scratch_dir(scratch);
    let ns = "vmmtest";
    let guest = "ip addr add 10.0.2.15/24 dev eth0; ip link set eth0 up; \
        echo MAC=$(cat /sys/class/net/eth0/address); \
        ping -c 3 -W 5 10.0.2.1 >/dev/null && echo PING=ok; \
        dd if=/dev/urandom of=/tmp/d bs=1M count=4 2>/dev/null; \
        echo GSENT=$(sha256sum </tmp/d); \
        nc 10.0.2.1 5000 </tmp/d; \
        mkfifo /tmp/f; exec 3<>/tmp/f; nc 10.0.2.1 5001 <&3 >/tmp/r; \
        echo GRECV=$(sha256sum </tmp/r) $(wc -c </tmp/r)";
    // Everything network-related happens inside the namespace; the vmm runs there too.
    // busybox nc exits when its peer half-closes, so each receiving side keeps its own
    // stdin open (a fifo nobody writes) and sends no FIN before the data is in.
    let cmd = format!(
        "set -e; ip() {{ host-exec ip \"$@\"; }}; \
         ip netns add {ns}; ip -n {ns} link set lo up; \
         ip -n {ns} tuntap add tap0 mode tap; ip -n {ns} addr add 10.0.2.1/24 dev tap0; \
         ip -n {ns} link set tap0 up; \
         if ip link show tap0 >/dev/null 2>&1; then echo TAP-IN-ROOT-NS; fi; \
         dd if=/dev/urandom of=/tmp/h bs=1M count=4 2>/dev/null; \
         echo HSENT=$(sha256sum </tmp/h); \
         mkfifo /tmp/hold; exec 4<>/tmp/hold; \
         ip netns exec {ns} nc -l -p 5000 <&4 >{rel}/from-guest & a=$!; \
         ip netns exec {ns} nc -l -p 5001 </tmp/h & b=$!; \
         set +e; \
         ip netns exec {ns} {vmm}; st=$?; \
         sleep 1; kill $a $b 2>/dev/null; wait; \
         echo HRECV=$(sha256sum <{rel}/from-guest) $(wc -c <{rel}/from-guest); \
         exit $st",
        vmm = command("--net tap=tap0,mac=02:00:00:00:00:2a", guest),
    );
    let run = run_guest(&cmd, Duration::from_secs(600));
    run.expect_status(0);
    assert!(
        !run.output.contains("TAP-IN-ROOT-NS"),
        "the tap is only in the namespace"
    );
    assert_eq!(
        run.value("MAC"),
        "02:00:00:00:00:2a",
        "MAC from config space"
    );
    assert_eq!(run.value("PING"), "ok");
    assert_eq!(
        run.value("HRECV"),
        run.value("GSENT"),
        "guest → host stream intact:\n{}",
        run.output
    );
    assert_eq!(
        run.value("GRECV"),
        run.value("HSENT"),
        "host → guest stream intact:\n{}",
        run.output
    );
    let _ = std::fs::remove_dir_all(&dir);
    run
}

/// The vsock checks native and hosted mode share, with a host program
/// (`vsock-peer`) on the Unix-socket side: the guest connects to the host's port 6000
/// and sends a line; the host connects to the guest's port 5000, sends a line and gets
/// the guest's answer; and the vmm removes its socket at the end. `command(vsock,
/// script)` is the vmm command line that runs `script` in the guest with the `--vsock`
/// option `vsock`.
pub fn check_vsock(scratch: &str, command: &dyn Fn(&str, &str) -> String) -> Run {
    let (dir, rel) = scratch_dir(scratch);
    let peer = vsock_peer_binary();
    let peer = peer.strip_prefix(root()).unwrap().display().to_string();
    // Unix sockets cannot live on the test host's 9p share: use its /tmp.
    let sock = "/tmp/v.sock".to_string();
    let guest = "echo guest-to-host | vsock connect 2 6000 && echo GCONNECT=ok; \
        echo guest-reply >/tmp/reply; vsock listen 5000 </tmp/reply >/tmp/got && echo GLISTEN=ok; \
        echo GGOT=$(cat /tmp/got)";
    let cmd = format!(
        "{peer} listen {sock}_6000 >{rel}/from-guest & l=$!; \
         {vmm} & v=$!; \
         i=0; until echo host-to-guest | {peer} connect {sock} 5000 >{rel}/answer 2>{rel}/peer.err; do \
           i=$((i+1)); [ $i -gt 240 ] && {{ echo GAVE-UP; cat {rel}/peer.err; break; }}; sleep 0.5; done; \
         wait $v; st=$?; kill $l 2>/dev/null; \
         echo HGOT=$(cat {rel}/from-guest); echo ANSWER=$(cat {rel}/answer); \
         [ -e {sock} ] && echo SOCKET-LEFT-BEHIND; exit $st",
        vmm = command(&format!("--vsock cid=3,socket={sock}"), guest),
    );
    let run = run_guest(&cmd, Duration::from_secs(600));
    run.expect_status(0);
    assert_eq!(run.value("GCONNECT"), "ok", "guest-initiated connection");
    assert_eq!(run.value("HGOT"), "guest-to-host");
    assert_eq!(run.value("GLISTEN"), "ok", "host-initiated connection");
    assert_eq!(run.value("GGOT"), "host-to-guest");
    assert_eq!(run.value("ANSWER"), "guest-reply");
    assert!(
        !run.output.contains("SOCKET-LEFT-BEHIND"),
        "the vmm removes its socket"
    );
    let _ = std::fs::remove_dir_all(&dir);
    run
}
