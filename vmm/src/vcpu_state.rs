//! The vCPU's life as the VMM sees it, and the kick that makes a running vCPU look.
//!
//! ```text
//!   Created --(loop starts)--> Running
//!   Created|Running --(pause)--> Pausing --(vCPU parks)--> Paused
//!   Pausing|Paused --(resume)--> Running
//!   Created|Running|Pausing|Paused --(stop)--> Stopping --(loop ends)--> Finished
//!   Running|Pausing --(guest stop or fault)--> Finished
//! ```
//!
//! Every change goes through [`VcpuState::can_become`]: a request that does not apply (a
//! pause of a finished vCPU, a resume of a running one) changes nothing.
//!
//! The kick: a request that needs the vCPU out of `KVM_RUN` sends it a real-time signal
//! whose handler, on the vCPU thread, sets the `immediate_exit` flag of the vCPU's
//! `kvm_run`. A signal that lands inside `KVM_RUN` makes it return `EINTR`; one that lands
//! just before the entry leaves the flag set, and KVM then returns at once. The loop clears
//! the flag *before* it looks at the state, so a request is never lost between the look and
//! the entry, and one signal is enough (no re-kick loop).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// Where the vCPU is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Built; its loop has not started.
    Created,
    /// In its loop, running guest code.
    Running,
    /// A pause is asked for; the vCPU has not parked yet.
    Pausing,
    /// Parked: no guest code runs until a resume.
    Paused,
    /// A stop is asked for; the loop has not ended yet.
    Stopping,
    /// The loop has ended; nothing of the guest runs any more.
    Finished,
}

impl VcpuState {
    /// Whether the diagram in the module docs has an edge from `self` to `next`.
    pub fn can_become(self, next: VcpuState) -> bool {
        use VcpuState::*;
        matches!(
            (self, next),
            (Created, Running | Pausing | Stopping | Finished)
                | (Running, Pausing | Stopping | Finished)
                | (Pausing, Paused | Running | Stopping | Finished)
                | (Paused, Running | Stopping)
                | (Stopping, Finished)
        )
    }
}

struct Inner {
    state: VcpuState,
    /// The vCPU thread while it is in its loop: kicks go there. Cleared under the same lock
    /// before the thread leaves the loop, so a kick sent under the lock never targets a
    /// thread that has gone.
    thread: Option<libc::pthread_t>,
}

/// Shared by the vCPU loop and its [`VcpuHandle`]s.
pub(crate) struct VcpuShared {
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Whether the state is anything but `Running`, mirrored out of the lock: the loop
    /// reads it before every entry, and a vCPU exit is frequent enough (every port access)
    /// that it should not take a lock to learn that nothing changed.
    attention: AtomicBool,
}

impl Default for VcpuShared {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner { state: VcpuState::Created, thread: None }),
            changed: Condvar::new(),
            attention: AtomicBool::new(true),
        }
    }
}

/// What the loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Run,
    Stop,
}

impl VcpuShared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves to `next` if the diagram allows it; returns the state it was in either way.
    fn transition(&self, inner: &mut Inner, next: VcpuState) -> Result<VcpuState, VcpuState> {
        let from = inner.state;
        if !from.can_become(next) {
            return Err(from);
        }
        inner.state = next;
        // Stored before any kick that follows the change (the kick is sent under the
        // same lock, after this returns), so a loop that missed it is kicked out.
        self.attention.store(next != VcpuState::Running, Ordering::SeqCst);
        self.changed.notify_all();
        Ok(from)
    }

    /// Sends the kick to the vCPU thread, if it is in its loop.
    fn kick(inner: &Inner) {
        if let Some(thread) = inner.thread {
            // SAFETY: `thread` is the vCPU thread, which is inside its loop: it clears
            // `inner.thread` under the lock we hold before leaving, so it is alive; the
            // signal's handler was installed before the thread entered the loop.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Called by the vCPU thread as its loop starts.
    pub(crate) fn enter(&self) {
        let mut inner = self.lock();
        // SAFETY: pthread_self has no preconditions.
        inner.thread = Some(unsafe { libc::pthread_self() });
        // A pause or stop asked for before the start stands.
        if inner.state == VcpuState::Created {
            let _ = self.transition(&mut inner, VcpuState::Running);
        }
    }

    /// Called by the loop before each entry into the guest: parks while paused.
    pub(crate) fn next_step(&self) -> Step {
        if !self.attention.load(Ordering::SeqCst) {
            return Step::Run;
        }
        let mut inner = self.lock();
        loop {
            match inner.state {
                VcpuState::Running => return Step::Run,
                VcpuState::Pausing => {
                    let _ = self.transition(&mut inner, VcpuState::Paused);
                }
                VcpuState::Paused => inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner()),
                VcpuState::Created | VcpuState::Stopping | VcpuState::Finished => return Step::Stop,
            }
        }
    }

    /// Called by the vCPU thread as its loop ends, whatever the reason.
    pub(crate) fn leave(&self) {
        let mut inner = self.lock();
        inner.thread = None;
        let _ = self.transition(&mut inner, VcpuState::Finished);
    }
}

/// Stops, pauses and resumes a machine's vCPU, from any thread.
#[derive(Clone)]
pub struct VcpuHandle(pub(crate) Arc<VcpuShared>);

impl VcpuHandle {
    pub fn state(&self) -> VcpuState {
        self.0.lock().state
    }

    /// Stops the vCPU: no further guest instruction runs once this returns.
    pub fn stop(&self) {
        let shared = &self.0;
        let mut inner = shared.lock();
        if shared.transition(&mut inner, VcpuState::Stopping).is_ok() {
            VcpuShared::kick(&inner);
        }
        // A loop that never started runs nothing; one that did ends soon.
        while inner.thread.is_some() && inner.state != VcpuState::Finished {
            inner = shared.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Pauses the vCPU: no guest instruction runs from the return until [`VcpuHandle::resume`].
    pub fn pause(&self) {
        let shared = &self.0;
        let mut inner = shared.lock();
        if shared.transition(&mut inner, VcpuState::Pausing).is_ok() {
            VcpuShared::kick(&inner);
        }
        while inner.thread.is_some() && inner.state == VcpuState::Pausing {
            inner = shared.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn resume(&self) {
        let shared = &self.0;
        let mut inner = shared.lock();
        if matches!(inner.state, VcpuState::Pausing | VcpuState::Paused) {
            let _ = shared.transition(&mut inner, VcpuState::Running);
        }
    }

    /// Makes a running `KVM_RUN` return and start again, its state unchanged: an interrupt
    /// raised from another thread is then delivered at the re-entry. (Under PVM an irqfd
    /// alone does not reach a vCPU running guest user code until its next exit, the
    /// guest's next timer tick.)
    pub fn nudge(&self) {
        VcpuShared::kick(&self.0.lock());
    }

    /// Whether a pause is asked for (the vCPU may still be on its way to park).
    pub fn is_paused(&self) -> bool {
        matches!(self.state(), VcpuState::Pausing | VcpuState::Paused)
    }
}

pub(crate) fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the kick's handler, once for the process (a handler is process-wide; machines
/// run one after another, or several at once in the tests, share it): the first outcome is
/// every caller's.
pub(crate) fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let outcome = INSTALLED.get_or_init(|| {
        // SAFETY: `on_kick` is async-signal-safe: it reads a thread-local pointer and writes
        // one byte of the vCPU's `kvm_run` mapping.
        register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno())
    });
    outcome.map_err(std::io::Error::from_raw_os_error)
}

thread_local! {
    /// The vCPU whose loop runs on this thread, for the kick's handler.
    static KICK_TARGET: Cell<*mut VcpuFd> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick's handler: on the vCPU thread, sets `immediate_exit` so that `KVM_RUN` returns
/// (or does not enter the guest at all).
pub(crate) extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let target = KICK_TARGET.with(Cell::get);
    if !target.is_null() {
        // SAFETY: the pointer is set by `KickTarget::register` on this very thread and
        // cleared before that vCPU is dropped or moved; the handler interrupts the loop on
        // this thread, which is either in `KVM_RUN` or between two entries, and the write is
        // one byte of the `kvm_run` mapping, as Firecracker's handler does.
        unsafe { (*target).set_kvm_immediate_exit(1) };
    }
}

/// Makes a vCPU the kick's target on the calling thread while this value lives.
pub(crate) struct KickTarget;

impl KickTarget {
    pub(crate) fn register(vcpu: &mut VcpuFd) -> Self {
        KICK_TARGET.with(|t| t.set(vcpu));
        KickTarget
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KICK_TARGET.with(|t| t.set(std::ptr::null_mut()));
    }
}

#[cfg(test)]
mod tests {
    use super::VcpuState::*;
    use super::*;

    #[test]
    fn only_the_diagrams_edges_are_allowed() {
        assert!(Created.can_become(Running));
        assert!(Running.can_become(Pausing) && Pausing.can_become(Paused) && Paused.can_become(Running));
        assert!(Paused.can_become(Stopping) && Stopping.can_become(Finished));
        assert!(!Finished.can_become(Running) && !Finished.can_become(Stopping));
        assert!(!Paused.can_become(Finished), "a parked vCPU ends only through a stop");
        assert!(!Stopping.can_become(Running) && !Running.can_become(Paused));
    }

    #[test]
    fn requests_on_a_vcpu_that_never_ran_return_at_once() {
        let handle = VcpuHandle(Arc::new(VcpuShared::default()));
        handle.pause();
        assert!(handle.is_paused());
        handle.resume();
        assert!(!handle.is_paused());
        handle.stop();
        assert_eq!(handle.state(), Stopping);
        handle.resume();
        assert_eq!(handle.state(), Stopping, "a stop is not undone");
    }

    #[test]
    fn a_loop_parks_on_pause_and_ends_on_stop() {
        let shared = Arc::new(VcpuShared::default());
        let handle = VcpuHandle(shared.clone());
        let looper = std::thread::spawn(move || {
            shared.enter();
            let mut steps = 0u64;
            while shared.next_step() == Step::Run {
                steps += 1;
                std::thread::yield_now();
            }
            shared.leave();
            steps
        });
        // SAFETY: `on_kick` is async-signal-safe; with no vCPU registered on the looping
        // thread it does nothing, and the signal only interrupts that thread.
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).unwrap();
        while handle.state() == Created {
            std::thread::yield_now();
        }
        // Each request kicks the looping thread, and returns once the loop took it.
        handle.pause();
        assert_eq!(handle.state(), Paused, "pause returns once the loop is parked");
        handle.resume();
        assert_eq!(handle.state(), Running);
        handle.stop();
        assert_eq!(handle.state(), Finished, "stop returns once the loop has ended");
        assert!(looper.join().unwrap() > 0);
    }
}
