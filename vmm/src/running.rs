//! A machine running on a thread of its own: the one way the CLI, torture, the tests and the
//! benches boot a machine and watch it, so that none of them reaches into the devices.

use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use devices::MachineStatus;

use crate::api::Controller;
use crate::error::Error;
use crate::machine::{Machine, RunOutcome};

/// How often [`RunningMachine::wait_for`] looks at the status.
const POLL: Duration = Duration::from_millis(2);

/// A running machine. It owns the vCPU thread: dropping the handle stops the machine (a
/// power failure) and joins the thread, so a failing caller leaves nothing running.
pub struct RunningMachine {
    controller: Controller,
    thread: Option<JoinHandle<Result<RunOutcome, Error>>>,
}

/// Why a wait for the guest ended without what it waited for.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("the machine stopped while waiting for {what}")]
    Stopped { what: String },
    #[error("no {what} within {limit:?}")]
    Timeout { what: String, limit: Duration },
}

impl RunningMachine {
    pub(crate) fn start(mut machine: Machine) -> Result<Self, Error> {
        let controller = machine.controller();
        let thread = thread::Builder::new()
            .name("vcpu".into())
            // The machine is dropped on this thread once it has run: the image and its lock
            // are released when the join returns, ready for the next boot.
            .spawn(move || machine.run())
            .map_err(|source| Error::Setup { what: "vCPU thread", source })?;
        Ok(Self { controller, thread: Some(thread) })
    }

    /// The machine's control interface.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// Whether the vCPU thread has ended (the guest stopped the machine, or it failed).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Polls the guest's status until `done` holds; fails if the machine stops first or
    /// after `limit`. Returns the status that satisfied `done`.
    pub fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        mut done: impl FnMut(&MachineStatus) -> bool,
    ) -> Result<MachineStatus, WaitError> {
        let deadline = Instant::now() + limit;
        loop {
            // Polled every few ms: the status is copied only once it is the one asked for.
            if let Some(status) = self.controller.with_status(|s| done(s).then(|| s.clone())) {
                return Ok(status);
            }
            if self.is_finished() {
                return Err(WaitError::Stopped { what: what.into() });
            }
            if Instant::now() > deadline {
                return Err(WaitError::Timeout { what: what.into(), limit });
            }
            thread::sleep(POLL);
        }
    }

    /// Waits for the run to end by itself (the guest powers off, or fails).
    pub fn wait(mut self) -> Result<RunOutcome, Error> {
        let thread = self.thread.take().expect("the thread is joined only here or on drop");
        match thread.join() {
            Ok(outcome) => outcome,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// A power failure: the vCPU stops dead, then the run's end is returned.
    pub fn stop(self) -> Result<RunOutcome, Error> {
        self.controller.crash();
        self.wait()
    }
}

impl Drop for RunningMachine {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.controller.crash();
            let _ = thread.join();
        }
    }
}
