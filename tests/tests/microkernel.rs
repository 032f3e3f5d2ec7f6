//! The microkernel in VM0 under real KVM (in the KVM test host by default; see the crate
//! doc): every test task passes, and the IPC benchmark reports its figures.

use std::time::Duration;

use integration_tests::run_guest;

const TIMEOUT: Duration = Duration::from_secs(300);

/// Every test task of `microkernel/user/src/bin/mktest/tests.rs`.
const TESTS: &[&str] = &[
    "ipc_call_reply",
    "ipc_timeouts",
    "ipc_server_two_clients",
    "map_unmap_recursive",
    "grant",
    "pager_lazy_alloc",
    "irq_as_ipc",
    "preemption",
    "fault_restart",
    "guest_exits_as_ipc",
];

#[test]
fn microkernel_selftest_passes_every_test_task() {
    let run = run_guest("vmm --microkernel --selftest", TIMEOUT);
    let lines: Vec<&str> = run
        .output
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .collect();
    for name in TESTS {
        assert!(
            lines.contains(&format!("PASS {name}").as_str()),
            "no PASS line for {name}:\n{}",
            run.output
        );
    }
    assert!(
        !lines.iter().any(|l| l.starts_with("FAIL ")),
        "a test failed:\n{}",
        run.output
    );
    let passes = lines.iter().filter(|l| l.starts_with("PASS ")).count();
    assert_eq!(passes, TESTS.len(), "unexpected tests:\n{}", run.output);
    run.expect_status(0);
}

#[test]
fn microkernel_ipc_benchmark_reports_cycles_and_instructions() {
    let run = run_guest("vmm --microkernel --bench-ipc", TIMEOUT);
    run.expect("TSC cycles").expect_status(0);
    // Counting by single-step needs hardware KVM (the test host); kvm-pvm says so.
    assert!(
        run.output
            .contains("ring-0 instructions per round trip in system calls")
            || run
                .output
                .contains("ring-0 instruction count unavailable on kvm-pvm"),
        "no instruction count:\n{}",
        run.output
    );
}

/// Hosted mode's lower half: a guest VM whose RAM is a region of VM0's RAM, mapped by a
/// guest server task, whose port exits reach that task as IPC. The same tiny guest runs
/// natively first; both must see every exit and every value read.
#[test]
fn guest_exits_reach_a_vm0_task_as_ipc_and_cost_is_reported() {
    let run = run_guest("vmm --microkernel --bench-exit 2000", TIMEOUT);
    run.expect("guest server: 2000 null exits as IPC")
        .expect("null exit round trip, guest TSC cycles: native")
        .expect_status(0);
    assert!(
        !run.output.contains("WRONG"),
        "values lost:\n{}",
        run.output
    );
    let line = run
        .output
        .lines()
        .find(|l| l.contains("per hosted exit"))
        .unwrap_or_else(|| panic!("no per-exit line:\n{}", run.output));
    // 2,000 null exits + 16 `in`s + start, cycles (2), sum, done: at least 2,021 exits
    let forwarded: u64 = line
        .rsplit('(')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exit count in {line:?}"));
    assert!(
        forwarded >= 2_021,
        "{forwarded} exits forwarded:\n{}",
        run.output
    );
    eprintln!("{}", run.output);
}
