//! The process table entry, as kept in NVM: everything needed to resume a process.

use nvram::table::Table;

/// Saved user registers, in the order the trap entry pushes them (`TrapFrame` in the kernel).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Scheduling state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum State {
    Runnable = 1,
    /// Sleeping until `wake_at` (timer ticks).
    Sleeping = 2,
}

/// One process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Process {
    /// A [`State`].
    pub state: u32,
    /// Its virtual space.
    pub space: u32,
    /// NUL-padded name (the workload's).
    pub name: [u8; 16],
    /// Tick at which a sleeping process wakes.
    pub wake_at: u64,
    /// Registers at its last entry into the kernel.
    pub regs: Regs,
}

impl Process {
    /// The name as text.
    pub fn name(&self) -> &str {
        let len = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        core::str::from_utf8(&self.name[..len]).unwrap_or("?")
    }

    pub fn state(&self) -> Option<State> {
        match self.state {
            1 => Some(State::Runnable),
            2 => Some(State::Sleeping),
            _ => None,
        }
    }
}

/// Most processes.
pub const PROCESSES: usize = 32;

/// The process table.
pub type ProcessTable = Table<Process, PROCESSES>;

/// The process after `current` (in table order, wrapping) that may run at tick `now`.
pub fn next_runnable(table: &ProcessTable, current: Option<u32>, now: u64) -> Option<u32> {
    let ready = |p: &Process| match p.state() {
        Some(State::Runnable) => true,
        Some(State::Sleeping) => p.wake_at <= now,
        None => false,
    };
    let start = current.map_or(0, |c| c + 1);
    let after = table.iter().filter(|(id, _)| *id >= start);
    let before = table.iter().filter(|(id, _)| *id < start);
    after.chain(before).find(|(_, p)| ready(p)).map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn proc(state: State, wake_at: u64) -> Process {
        Process {
            state: state as u32,
            space: 0,
            name: *b"test\0\0\0\0\0\0\0\0\0\0\0\0",
            wake_at,
            regs: Regs::default(),
        }
    }

    #[test]
    fn round_robin_skips_sleepers_until_their_tick() {
        // SAFETY: every bit pattern is a valid table (integers only).
        let mut table: std::boxed::Box<ProcessTable> = unsafe { std::boxed::Box::new_zeroed().assume_init() };
        table.format(6);
        let a = table.insert(proc(State::Runnable, 0)).unwrap();
        let b = table.insert(proc(State::Sleeping, 10)).unwrap();
        let c = table.insert(proc(State::Runnable, 0)).unwrap();
        assert_eq!(next_runnable(&table, None, 0), Some(a));
        assert_eq!(next_runnable(&table, Some(a), 0), Some(c), "b sleeps");
        assert_eq!(next_runnable(&table, Some(c), 0), Some(a), "wraps");
        assert_eq!(next_runnable(&table, Some(a), 10), Some(b), "b woke");
        assert_eq!(table.get(a).unwrap().name(), "test");
        table.remove(a);
        table.remove(c);
        assert_eq!(next_runnable(&table, Some(b), 5), None);
    }
}
