//! What a boot costs the machine beyond its work: the trips of the guest kernel to ring-3
//! kernel work (each about 0.15 ms under PVM, whose kernel mode is emulated) and its VM
//! exits to the UART, counted by the guest and the VMM. Counts, not times: a boot that
//! makes more of either than it needs fails here on any host.

mod common;

use std::time::Duration;

use common::{machine_config, Scratch};
use nvram::control::BootKind;
use vmm::harness::run_then_crash;

/// Trips to CPL 3 a restore's boot may make up to its boot report: the kernel's own four
/// (its boot up to the restore in two, the state's install and the processes' resumption),
/// the restore's bookkeeping (one today, the plate function's), and one to spare. With a
/// trip per print, as before, the boot made 9.
const RESTORE_WORK_RUNS: u32 = 6;

/// A crash of a running `counter`, then a restore: the restore's boot makes no more trips to
/// CPL 3 than its work needs (the prints among them add none: they run inside the kernel's
/// runs), and neither boot touches the UART, since the console goes through the
/// machine-control device.
#[test]
fn a_restore_boot_goes_to_cpl3_a_few_times_and_never_to_the_uart() {
    let scratch = Scratch::new();
    let config = machine_config(&scratch, "apps=counter", 32 << 20);
    let cold = run_then_crash(&config, Duration::from_secs(30), |s| {
        s.workloads.get("counter").is_some_and(|w| w.progress > 0) && s.committed_generation > 0
    });
    assert_eq!(cold.boot_kind, Some(BootKind::Cold));
    assert_eq!(cold.uart_accesses, 0, "the cold boot configured or used the UART");

    let config = machine_config(&scratch, "", 32 << 20);
    let restored = run_then_crash(&config, Duration::from_secs(30), |s| s.running.is_some());
    assert_eq!(restored.boot_kind, Some(BootKind::Restored), "{}", scratch.read_console());
    assert_eq!(restored.uart_accesses, 0, "the restore's boot configured or used the UART");
    assert!(
        (1..=RESTORE_WORK_RUNS).contains(&restored.boot_work_runs),
        "the restore's boot went to CPL 3 {} times (at most {RESTORE_WORK_RUNS} expected)\n{}",
        restored.boot_work_runs,
        scratch.read_console()
    );
}

/// The UART still works when it must: a fault in ring-3 kernel work is reported through
/// it (the fatal path prints there, whatever the machine), configured on the spot.
#[test]
fn the_fatal_path_configures_the_uart_it_prints_on() {
    let scratch = Scratch::new();
    let config = machine_config(&scratch, "fault=work-ud", 32 << 20);
    let (_, status) = vmm::harness::run_to_end(&config);
    assert!(scratch.read_console().contains("KERNEL FAULT in ring-3 kernel work"), "{}", scratch.read_console());
    assert!(status.uart_accesses > 0, "the fault was printed without the UART?");
}
