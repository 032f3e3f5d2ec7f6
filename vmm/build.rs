//! Build the microkernel (`microkernel/kernel`) and the VM0 boot module
//! (`microkernel/user`, binary `mktest`) as freestanding x86_64 ELFs, for `vmm/src/mk`
//! to embed with `include_bytes!`. Both crates are their own workspaces (panic=abort in
//! every profile, never host test harnesses), built by a nested cargo with a clean
//! environment: the outer build's RUSTFLAGS (e.g. `+crt-static` for the test host's
//! static vmm) and CARGO_* variables must not leak into it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Flags for freestanding binaries; link arguments come from each crate's build.rs.
const RUSTFLAGS: &str = "-C relocation-model=static";
/// The kernel also avoids SSE in its own code: kvm-pvm emulates guest ring 0 with KVM's
/// instruction emulator, which knows SSE moves but not SSE arithmetic (pxor, pcmpeqd,
/// ...) that LLVM emits for copies and fills. rustc warns that the target ABI wants
/// SSE2; the kernel passes no floating-point values, so the ABI difference is moot.
const KERNEL_RUSTFLAGS: &str = "-C relocation-model=static -C target-feature=-sse,-sse2";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let mk = manifest.parent().unwrap().join("microkernel");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for (krate, bin, flags) in [
        ("kernel", "mk-kernel", KERNEL_RUSTFLAGS),
        ("user", "mktest", RUSTFLAGS),
    ] {
        let dir = mk.join(krate);
        // One target directory per crate: their flags differ.
        let target_dir = out.join("mk-target").join(krate);
        let mut cmd = Command::new(&cargo);
        cmd.args([
            "build",
            "--release",
            "--offline",
            "--quiet",
            "--target",
            TARGET,
        ])
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&dir);
        for (key, _) in env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            let keep = matches!(key.as_str(), "CARGO_HOME" | "CARGO_MAKEFLAGS" | "CARGO");
            if (key.starts_with("CARGO_") && !keep)
                || matches!(
                    key.as_str(),
                    "RUSTFLAGS"
                        | "RUSTDOCFLAGS"
                        | "RUSTC_WORKSPACE_WRAPPER"
                        | "TARGET"
                        | "HOST"
                        | "OUT_DIR"
                )
            {
                cmd.env_remove(&key);
            }
        }
        cmd.env("RUSTFLAGS", flags);
        let status = cmd.status().expect("run cargo for the microkernel");
        assert!(status.success(), "building microkernel/{krate} failed");
        let built = target_dir.join(TARGET).join("release").join(bin);
        std::fs::copy(&built, out.join(format!("{bin}.elf")))
            .unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
    }
    rerun_if_changed(&mk.join("src"));
    rerun_if_changed(&mk.join("freestanding"));
    for krate in ["kernel", "user"] {
        let dir = mk.join(krate);
        for f in ["Cargo.toml", "build.rs", "kernel.ld", "user.ld"] {
            if dir.join(f).exists() {
                println!("cargo:rerun-if-changed={}", dir.join(f).display());
            }
        }
        rerun_if_changed(&dir.join("src"));
    }
    println!("cargo:rerun-if-changed={}", mk.join("Cargo.toml").display());
    println!("cargo:rerun-if-changed=build.rs");
}

fn rerun_if_changed(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                rerun_if_changed(&p);
            } else {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}
