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
