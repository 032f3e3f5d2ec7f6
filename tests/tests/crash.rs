//! Crash consistency: the vmm is killed with SIGKILL while a guest writes and flushes
//! numbered records to its disk; every record acknowledged by a completed flush must be
//! intact afterwards. Three rounds here; `tests/crash/run N` runs more.

use std::time::Duration;

use integration_tests::{image, run_guest};

#[test]
fn records_acknowledged_by_a_flush_survive_sigkill() {
    image("minimal/bzImage");
    let run = run_guest("sh tests/crash/inner.sh 3", Duration::from_secs(300));
    let summary = run
        .output
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("CRASH "))
        .unwrap_or_else(|| panic!("no summary line:\n{}", run.output));
    let field = |k: &str| -> u64 {
        summary
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {summary:?}"))
    };
    assert_eq!(field("failures"), 0, "{}", run.output);
    assert!(
        field("acked") > 0,
        "the guest acknowledged nothing before the kills:\n{}",
        run.output
    );
    run.expect_status(0);
    eprintln!("{summary}");
}
