//! A hostile guest: `hostile` (guest-images/tools/hostile.c) takes over a spare virtio-blk
//! disk and the virtio-rng from inside a running guest (unbinds Linux's driver, maps the
//! register window through /dev/mem, builds its own rings in its own pages) and throws
//! corrupt rings, bad queue configurations, bad feature sets, buffers outside RAM,
//! notification and config-write storms, unassigned MMIO and unassigned I/O ports at the
//! vmm. Each case must behave as README.md documents ("Untrusted guest input"), and after
//! all of it, in the same boot, the other disk must still read and write correctly while
//! the test host watches the vmm's memory from /proc.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use integration_tests::{image, pattern, run_guest, scratch_dir, sha256, Run};

const TIMEOUT: Duration = Duration::from_secs(600);
const MIB: usize = 1 << 20;
/// Guest RAM of the hostile boot (`--memory`), in MiB.
const GUEST_MIB: u64 = 256;

/// Cases `hostile` runs against every device; each must print `HOSTILE <case> ok ...`.
const COMMON_CASES: &[&str] = &[
    "baseline",
    "notify-before-driver-ok",
    "notify-missing-queue",
    "notify-storm",
    "desc-loop",
    "chain-longer-than-queue",
    "head-index-out-of-range",
    "next-index-out-of-range",
    "indirect-descriptor",
    "readable-after-writable",
    "avail-index-far-ahead",
    "avail-index-one-past-size",
    "queue-size-0",
    "queue-size-not-power-of-2",
    "queue-size-above-max",
    "queue-size-65536",
    "ring-outside-ram",
    "ring-at-mmio-window",
    "ring-misaligned",
    "ring-crosses-end-of-ram",
    "frozen-after-driver-ok",
    "queue-select-out-of-range",
    "features-without-version-1",
    "features-not-offered",
    "features-word-not-offered",
    "features-select-out-of-range",
    "config-write-storm",
    "register-widths",
    "unassigned-mmio-0xd00ff000",
    "unassigned-mmio-0xe0000000",
    "unassigned-mmio-0x100000000",
    "unassigned-ports-0x100-0x1ff",
];

/// Bad requests against virtio-blk: `IOERR` (`UNSUPP` for an unknown type, no status at
/// all when the status byte is unreachable), nothing read or written, the queue still
/// usable.
const BLK_CASES: &[&str] = &[
    "read-into-outside-ram",
    "read-into-mmio-window",
    "read-into-own-window",
    "read-partly-outside-ram",
    "read-len-0xffffffff",
    "read-partial-sector",
    "read-past-end-of-disk",
    "read-status-outside-ram",
    "read-status-len-0",
    "header-too-short",
    "unknown-request-type",
    "write-from-outside-ram",
    "write-from-mmio-window",
    "write-partly-outside-ram",
    "write-len-0xffffffff",
    "write-partial-sector",
    "write-past-end-of-disk",
];

/// Requests with bad buffers against virtio-rng: a short (or empty) fill, at most 64 KiB
/// whatever the descriptor says, the queue still usable.
const RNG_CASES: &[&str] = &[
    "buffer-outside-ram",
    "buffer-at-mmio-window",
    "buffer-at-own-window",
    "buffer-crossing-out-of-ram",
    "buffer-len-0xffffffff",
    "buffer-len-0",
];

fn scratch(test: &str) -> (PathBuf, String) {
    scratch_dir(&format!("hostile-{test}"))
}

fn lines(run: &Run) -> impl Iterator<Item = &str> {
    run.lines()
}

fn value<'a>(run: &'a Run, key: &str) -> &'a str {
    run.value(key)
}

/// The `HOSTILE ...` lines of one `hostile` run: the output between its
/// `HOSTILE-INFO device=<kind>` line and its `HOSTILE-SUMMARY device=<kind>` line.
fn hostile_section<'a>(run: &'a Run, kind: &str) -> Vec<&'a str> {
    let start = format!("HOSTILE-INFO device={kind} ");
    let end = format!("HOSTILE-SUMMARY device={kind} ");
    let section: Vec<&str> = lines(run)
        .skip_while(|l| !l.starts_with(&start))
        .take_while(|l| !l.starts_with(&end))
        .filter(|l| l.starts_with("HOSTILE "))
        .collect();
    assert!(
        !section.is_empty(),
        "no hostile run against the {kind} device in the output:\n{}",
        run.output
    );
    section
}

/// Every expected case reported `ok`, nothing reported `FAIL`, the summary agrees.
fn check_cases(run: &Run, kind: &str, specific: &[&str]) {
    let section = hostile_section(run, kind);
    let failed: Vec<&&str> = section.iter().filter(|l| l.contains(" FAIL ")).collect();
    assert!(
        failed.is_empty(),
        "{kind}: cases that did not behave as documented:\n{}\n\nwhole output:\n{}",
        failed
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        run.output
    );
    let expected: Vec<&str> = COMMON_CASES.iter().chain(specific).copied().collect();
    for case in &expected {
        let ok = format!("HOSTILE {case} ok");
        assert!(
            section
                .iter()
                .any(|l| *l == ok || l.starts_with(&format!("{ok} "))),
            "{kind}: no `{ok}` line:\n{}",
            run.output
        );
    }
    assert_eq!(
        section.len(),
        expected.len(),
        "{kind}: hostile ran other cases than this test knows:\n{}",
        section.join("\n")
    );
    let summary = format!(
        "HOSTILE-SUMMARY device={kind} cases={} failed=0",
        expected.len()
    );
    assert!(
        lines(run).any(|l| l == summary),
        "no `{summary}` line:\n{}",
        run.output
    );
}

/// One sample of the vmm's memory, taken by the test host every half second.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// `HOSTILE ` lines the guest had printed by then (0: hostile not started yet).
    progress: u64,
    rss_kib: u64,
    hwm_kib: u64,
    /// Resident part of the guest-RAM mapping (the one mapping of exactly GUEST_MIB).
    guest_kib: u64,
    /// Everything else resident: the vmm's own memory.
    own_kib: u64,
}

fn samples(run: &Run) -> Vec<Sample> {
    lines(run)
        .filter_map(|l| {
            let v: Vec<u64> = l
                .strip_prefix("SAMPLE ")?
                .split_whitespace()
                .map(|w| w.parse().ok())
                .collect::<Option<_>>()?;
            // The vmm may exit between two reads of /proc (an exiting process has an
            // empty smaps): keep complete samples only.
            (v.len() == 5 && v[3] + v[4] > 0).then(|| Sample {
                progress: v[0],
                rss_kib: v[1],
                hwm_kib: v[2],
                guest_kib: v[3],
                own_kib: v[4],
            })
        })
        .collect()
}

#[test]
fn a_hostile_driver_gets_the_documented_answers_and_the_vmm_stays_up_and_bounded() {
    let (dir, rel) = scratch("devices");
    let vda_before = pattern(4 * MIB, 0xa11ce);
    fs::write(dir.join("vda.img"), &vda_before).unwrap();
    let spare = pattern(MIB, 0x5bae);
    fs::write(dir.join("spare.img"), &spare).unwrap();

    // Windows in command-line order: vda 0xd0000000, vdb (the spare) 0xd0001000, rng
    // 0xd0002000. After both hostile runs only vda is left to Linux; it must still read
    // the host's data and write the guest's.
    let guest = "hostile 0xd0001000; echo HOSTILE-EXIT-BLK=$?; \
        hostile 0xd0002000; echo HOSTILE-EXIT-RNG=$?; \
        echo NDEV=$(ls /sys/bus/virtio/devices | wc -l); \
        echo R=$(dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum); \
        dd if=/dev/urandom of=/tmp/p bs=1M count=1 2>/dev/null; \
        echo W=$(sha256sum </tmp/p); \
        dd if=/tmp/p of=/dev/vda bs=64k seek=32 oflag=direct conv=fsync 2>/dev/null && echo WRITE=ok; \
        echo RB=$(dd if=/dev/vda bs=64k skip=32 count=16 iflag=direct 2>/dev/null | sha256sum); \
        exit 7";
    let vmm = format!(
        "vmm --kernel {} --initrd {} --memory {GUEST_MIB}M --disk {rel}/vda.img \
         --disk {rel}/spare.img --cmdline 'console=ttyS0 panic=-1 pci=off quiet -- \"{guest}\"'",
        image("minimal/bzImage"),
        image("minimal/initramfs.cpio.gz")
    );
    // The vmm runs in the background (killed after 300 s, so a hang shows how far the
    // guest got instead of ending in the harness's silent timeout); every 0.5 s the test
    // host records how far the guest got, VmRSS/VmHWM, and (from smaps) how much of the resident memory is the
    // guest-RAM mapping and how much is the vmm's own.
    let guest_kib = GUEST_MIB * 1024;
    let cmd = format!(
        "log=/tmp/vmm.log; smp=/tmp/samples; : >$smp; \
         {vmm} >$log 2>&1 & pid=$!; i=0; \
         while grep -q '^VmRSS' /proc/$pid/status 2>/dev/null; do \
           i=$((i+1)); [ $i -gt 600 ] && {{ echo VMM-HUNG after 300 s; kill -9 $pid; }}; \
           n=$(grep -c '^HOSTILE ' $log); \
           st=$(awk '/^VmRSS:/{{r=$2}} /^VmHWM:/{{h=$2}} END{{print r, h}}' /proc/$pid/status 2>/dev/null); \
           mp=$(awk '/^Size:/{{s=$2}} /^Rss:/{{if (s=={guest_kib}) g+=$2; else o+=$2}} END{{print g+0, o+0}}' /proc/$pid/smaps 2>/dev/null); \
           echo SAMPLE $n $st $mp >>$smp; sleep 0.5; \
         done; \
         wait $pid; st=$?; cat $log; cat $smp; echo VMM-EXIT=$st; exit $st"
    );
    let run = run_guest(&cmd, TIMEOUT);

    // The vmm itself: no panic, no error, and it ended with the guest's own status.
    assert!(
        !run.output.contains("panicked at"),
        "the vmm panicked:\n{}",
        run.output
    );
    assert!(
        !run.output.contains("vmm: "),
        "the vmm reported an error:\n{}",
        run.output
    );
    assert_eq!(
        value(&run, "VMM-EXIT"),
        "7",
        "vmm exit status:\n{}",
        run.output
    );
    run.expect_status(7);

    // The hostile driver: every case as documented.
    check_cases(&run, "blk", BLK_CASES);
    check_cases(&run, "rng", RNG_CASES);
    assert_eq!(value(&run, "HOSTILE-EXIT-BLK"), "0");
    assert_eq!(value(&run, "HOSTILE-EXIT-RNG"), "0");
    assert_eq!(
        value(&run, "NDEV"),
        "1",
        "Linux keeps only vda (hostile unbound the others)"
    );
    assert_eq!(
        fs::read(dir.join("spare.img")).unwrap(),
        spare,
        "no bad request wrote to the spare disk"
    );

    // The other disk, in the same boot: reads the host's data, writes the guest's.
    assert_eq!(
        value(&run, "R"),
        sha256(&vda_before),
        "vda read after the attack"
    );
    assert_eq!(value(&run, "WRITE"), "ok");
    assert_eq!(value(&run, "RB"), value(&run, "W"), "vda read-back");
    let vda = fs::read(dir.join("vda.img")).unwrap();
    assert_eq!(
        sha256(&vda[2 * MIB..3 * MIB]),
        value(&run, "W"),
        "vda write reached the file"
    );
    assert!(
        vda[..2 * MIB] == vda_before[..2 * MIB] && vda[3 * MIB..] == vda_before[3 * MIB..],
        "nothing else on vda changed"
    );

    // Memory. Samples every 0.5 s over a run of about a minute.
    let s = samples(&run);
    assert!(
        s.len() >= 20 && s.iter().any(|x| x.progress == 0) && s.iter().any(|x| x.progress > 40),
        "too few memory samples before and during the attack ({}):\n{}",
        s.len(),
        run.output
    );
    // Once the guest runs, its RAM mapping must be the one told apart in smaps (else
    // "outside guest RAM" below would mean nothing).
    assert!(
        s.iter()
            .filter(|x| x.progress > 0)
            .all(|x| x.guest_kib > 0 && x.guest_kib <= guest_kib),
        "the guest-RAM mapping ({guest_kib} KiB) was not found in smaps:\n{s:#?}"
    );
    let hwm = s.iter().map(|x| x.hwm_kib).max().unwrap();
    let own_max = s.iter().map(|x| x.own_kib).max().unwrap();
    let own_before = s
        .iter()
        .filter(|x| x.progress == 0 && x.guest_kib > 0)
        .map(|x| x.own_kib)
        .max()
        .unwrap();
    let rss_max = s.iter().map(|x| x.rss_kib).max().unwrap();
    eprintln!(
        "vmm memory: VmHWM {hwm} KiB, VmRSS max {rss_max} KiB; outside guest RAM: {own_before} KiB \
         before the attack, {own_max} KiB max ({} samples)",
        s.len()
    );
    // Guest RAM can be resident at most once; everything the vmm holds besides it (code,
    // thread stacks, the devices' fixed buffers: one 64 KiB bounce buffer per disk) is a
    // few MiB, so 64 MiB of slack means memory the guest made the vmm allocate.
    assert!(
        hwm < (GUEST_MIB + 64) * 1024,
        "vmm VmHWM {hwm} KiB: more than guest RAM + 64 MiB"
    );
    // Outside guest RAM: small, and not growing with what the guest throws at it.
    assert!(
        own_max < 32 * 1024,
        "vmm memory outside guest RAM reached {own_max} KiB"
    );
    assert!(
        own_max < own_before + 4 * 1024,
        "vmm memory outside guest RAM grew from {own_before} KiB to {own_max} KiB during the attack"
    );
    let _ = fs::remove_dir_all(&dir);
}
