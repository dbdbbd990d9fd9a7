//! Boot-and-watch helpers for the integration tests and the benchmarks (feature `harness`):
//! the one copy of "boot on a thread, poll the status, then crash", with panics that say
//! what was awaited, since a test has nothing better to do with a failure.

use std::time::Duration;

use devices::MachineStatus;

use crate::{Machine, RunOutcome, RunningMachine, VmConfig};

/// Builds and starts `config`, or panics with the reason.
pub fn start(config: &VmConfig) -> RunningMachine {
    Machine::build(config).and_then(Machine::spawn).unwrap_or_else(|e| panic!("cannot start the machine: {e:#}"))
}

/// Waits for `done` on a running machine, or panics with the last status.
pub fn wait(
    vm: &RunningMachine,
    limit: Duration,
    what: &str,
    done: impl FnMut(&MachineStatus) -> bool,
) -> MachineStatus {
    vm.wait_for(limit, what, done).unwrap_or_else(|e| panic!("{e}; status: {:?}", vm.controller().snapshot()))
}

/// A power failure: stops the vCPU dead, and checks the run ended by the stop.
pub fn crash(vm: RunningMachine) {
    match vm.stop() {
        Ok(RunOutcome::Stopped) => {}
        other => panic!("the machine did not stop on request: {other:?}"),
    }
}

/// Boots `config` until `done` holds (panicking after `limit` or if the machine stops), then
/// stops the vCPU dead: no guest instruction runs after that, and guest RAM is the image
/// file, so this is a power failure. Returns the status that satisfied `done`.
pub fn run_then_crash(config: &VmConfig, limit: Duration, done: impl FnMut(&MachineStatus) -> bool) -> MachineStatus {
    let vm = start(config);
    let status = wait(&vm, limit, "the condition", done);
    crash(vm);
    status
}

/// Boots `config` and runs it to its end on the calling thread (the guest powers off).
pub fn run_to_end(config: &VmConfig) -> (RunOutcome, MachineStatus) {
    let vm = start(config);
    let controller = vm.controller().clone();
    let outcome = vm.wait().unwrap_or_else(|e| panic!("the run failed: {e:#}"));
    (outcome, controller.snapshot())
}
