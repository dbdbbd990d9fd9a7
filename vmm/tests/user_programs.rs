//! The embedded programs (`vmm::apps`), run on the host: each ELF is loaded into a child
//! process at its own addresses as the kernel's loader does (`docs/abi.md`), entered with
//! its argument string in `rdi`/`rsi`, and its system calls (`int3`, so SIGTRAP here) are
//! served by a signal handler that plays the kernel's part: console, clock, `map` and
//! `unmap` with a budget of pages, `report`, `exit`, and `checkpoint` by `fork`: the copy
//! stops itself, and a "crash" kills the running process and lets the copy go on with
//! `RESTORED`, the memory and registers it had at the call, as a restore gives them.
//!
//! So the programs' own logic (argument parsing, console lines, reports, the restored
//! timeline) is checked without the guest kernel; the integration tests in `tests/` boot
//! them in it.

use std::collections::BTreeSet;
use std::ffi::c_void;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvram::abi::{err, nr, NAME_LEN, RESTORED, SAVED, STACK_PAGES, USER_BASE};

const PAGE: u64 = 4096;
/// Pages `map` gives in all, before it answers `NO_MEMORY` (the frames of a small machine).
const BUDGET_PAGES: u64 = 4096;
/// Most regions mapped at once (the user-space table).
const MAX_REGIONS: usize = 1000;
/// Where `map`'s regions start: above the stack.
const MAP_BASE: u64 = USER_BASE + (1 << 30);
/// How long a program may take to print what a test waits for (a failure guard only).
const PATIENCE: Duration = Duration::from_secs(60);

/// A segment to load: its first page, its length in whole pages, its bytes (from the
/// segment's offset in its first page) and protection.
struct Segment {
    vaddr: u64,
    memsz: u64,
    start_in_page: u64,
    bytes: Vec<u8>,
    prot: i32,
}

/// The segments as the kernel's loader reads them: with its very check
/// (`nvram::program::check`), which the ELF must pass first.
fn segments(elf: &[u8]) -> (Vec<Segment>, u64) {
    let program = nvram::program::check(elf).expect("a program the kernel loads");
    let segments = program
        .segments()
        .iter()
        .map(|s| Segment {
            vaddr: s.vaddr,
            memsz: s.pages * PAGE,
            start_in_page: s.start_in_page,
            bytes: elf[s.file_offset as usize..(s.file_offset + s.file_len) as usize].to_vec(),
            prot: libc::PROT_READ
                | if s.writable { libc::PROT_WRITE } else { 0 }
                | if s.executable { libc::PROT_EXEC } else { 0 },
        })
        .collect();
    (segments, program.entry)
}

/// The child's state: one thread, touched by its signal handlers only after the jump.
struct Kernel {
    out: i32,
    start: libc::timespec,
    next_map: u64,
    budget: u64,
    regions: [(u64, u64); MAX_REGIONS],
    snapshot: i32,
}

static mut KERNEL: Kernel = Kernel {
    out: -1,
    start: libc::timespec { tv_sec: 0, tv_nsec: 0 },
    next_map: MAP_BASE,
    budget: BUDGET_PAGES,
    regions: [(0, 0); MAX_REGIONS],
    snapshot: 0,
};

/// A line formatted on the stack (no allocation in a forked child's signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn say(k: &Kernel, args: std::fmt::Arguments) {
    let mut line = Line { buf: [0; 256], len: 0 };
    let _ = std::fmt::Write::write_fmt(&mut line, args);
    // SAFETY: writes `line`'s bytes to the pipe.
    unsafe { libc::write(k.out, line.buf.as_ptr().cast(), line.len) };
}

fn now_ns(k: &Kernel) -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: fills `t`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    ((t.tv_sec - k.start.tv_sec) as i128 * 1_000_000_000 + (t.tv_nsec - k.start.tv_nsec) as i128) as u64
}

/// One system call, as the kernel answers it.
fn serve(k: &mut Kernel, number: u64, a: u64, b: u64, c: u64, d: u64) -> u64 {
    match number {
        nr::WRITE => {
            let len = b.min(4096);
            // SAFETY: the program's own bytes, written to the pipe (a bad address fails the write).
            unsafe { libc::write(k.out, a as *const c_void, len as usize) };
            len
        }
        nr::YIELD => 0,
        nr::SLEEP => {
            let t = libc::timespec { tv_sec: (a / 1000) as i64, tv_nsec: ((a % 1000) * 1_000_000) as i64 };
            // SAFETY: a plain sleep.
            unsafe { libc::nanosleep(&t, std::ptr::null_mut()) };
            0
        }
        nr::TIME => now_ns(k),
        nr::MAP => {
            if a == 0 || a > 8192 {
                return err::INVALID;
            }
            let Some(slot) = k.regions.iter().position(|r| r.1 == 0) else { return err::NO_MEMORY };
            if a > k.budget {
                return err::NO_MEMORY;
            }
            let addr = k.next_map;
            // SAFETY: fresh anonymous pages at an address nothing else uses (NOREPLACE).
            let p = unsafe {
                libc::mmap(
                    addr as *mut c_void,
                    (a * PAGE) as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p as u64 != addr {
                return err::NO_MEMORY;
            }
            k.next_map += (a + 1) * PAGE;
            k.budget -= a;
            k.regions[slot] = (addr, a);
            addr
        }
        nr::UNMAP => match k.regions.iter().position(|r| r.0 == a && r.1 != 0) {
            Some(slot) => {
                let pages = k.regions[slot].1;
                // SAFETY: a region this handler mapped.
                unsafe { libc::munmap(a as *mut c_void, (pages * PAGE) as usize) };
                k.budget += pages;
                k.regions[slot] = (0, 0);
                0
            }
            None => err::BAD_ADDRESS,
        },
        nr::EXIT => {
            say(k, format_args!("process exited with code {a}\n"));
            // SAFETY: ends the child.
            unsafe { libc::_exit(a as i32) }
        }
        nr::CHECKPOINT => {
            // SAFETY: the child has one thread; the copy takes the whole address space.
            match unsafe { libc::fork() } {
                0 => {
                    // The copy: waits for the "crash", then resumes with the restored result.
                    // SAFETY: stops this process until the test continues it.
                    unsafe { libc::raise(libc::SIGSTOP) };
                    say(k, format_args!("restored\n"));
                    RESTORED
                }
                pid if pid > 0 => {
                    if k.snapshot > 0 {
                        // SAFETY: the copy of the checkpoint before, superseded.
                        unsafe { libc::kill(k.snapshot, libc::SIGKILL) };
                    }
                    k.snapshot = pid;
                    say(k, format_args!("snapshot {pid}\n"));
                    SAVED
                }
                _ => err::NO_MEMORY,
            }
        }
        nr::REPORT => {
            // SAFETY: the name's bytes, in the program's memory.
            let name = unsafe { std::slice::from_raw_parts(a as *const u8, NAME_LEN) };
            let len = name.iter().position(|&c| c == 0).unwrap_or(NAME_LEN);
            let name = std::str::from_utf8(&name[..len]).unwrap_or("<invalid>");
            say(k, format_args!("report {name} {b} {c} {d}\n"));
            0
        }
        nr::SHUTDOWN => 0,
        _ => err::NO_SUCH_CALL,
    }
}

extern "C" fn on_trap(_: i32, _: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel hands a SA_SIGINFO handler the interrupted context; the child is
    // single-threaded, so KERNEL is this handler's alone.
    unsafe {
        let regs = &mut (*(context as *mut libc::ucontext_t)).uc_mcontext.gregs;
        let reg = |r: i32| regs[r as usize] as u64;
        let (number, a, b, c, d) =
            (reg(libc::REG_RAX), reg(libc::REG_RDI), reg(libc::REG_RSI), reg(libc::REG_RDX), reg(libc::REG_R10));
        let k = &mut *std::ptr::addr_of_mut!(KERNEL);
        regs[libc::REG_RAX as usize] = serve(k, number, a, b, c, d) as i64;
    }
}

extern "C" fn on_fault(_: i32, info: *mut libc::siginfo_t, _: *mut c_void) {
    // SAFETY: as in `on_trap`.
    unsafe {
        let k = &*std::ptr::addr_of!(KERNEL);
        say(k, format_args!("process killed: fault at {:#x}\n", (*info).si_addr() as u64));
        libc::_exit(139)
    }
}

/// In the forked child: loads the program, and jumps to its entry. Never returns.
///
/// # Safety
///
/// Only in a child just forked: it maps at fixed addresses and never goes back.
unsafe fn run_child(segments: &[Segment], entry: u64, args: &[u8], out: i32, alt_stack: &mut [u8]) -> ! {
    let fixed = |addr: u64, len: u64, prot: i32| {
        // SAFETY: anonymous pages at an address nothing uses (NOREPLACE refuses otherwise).
        let p = unsafe {
            libc::mmap(
                addr as *mut c_void,
                len as usize,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p as u64 != addr {
            // SAFETY: ends the child.
            unsafe { libc::_exit(90) }
        }
    };
    // SAFETY: the child's own address space; KERNEL is not yet used by a handler.
    unsafe {
        let k = &mut *std::ptr::addr_of_mut!(KERNEL);
        k.out = out;
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut k.start);
        for s in segments {
            let len = s.memsz.next_multiple_of(PAGE);
            fixed(s.vaddr, len, libc::PROT_READ | libc::PROT_WRITE);
            std::ptr::copy_nonoverlapping(s.bytes.as_ptr(), (s.vaddr + s.start_in_page) as *mut u8, s.bytes.len());
            libc::mprotect(s.vaddr as *mut c_void, len as usize, s.prot);
        }
        // The kernel's memory the `fault` program writes to: present here, and out of reach.
        fixed(nvram::layout::ROOT_HEADER, PAGE, libc::PROT_NONE);
        let stack = USER_BASE;
        fixed(stack, STACK_PAGES * PAGE, libc::PROT_READ | libc::PROT_WRITE);
        let args_at = stack + STACK_PAGES * PAGE - args.len() as u64;
        std::ptr::copy_nonoverlapping(args.as_ptr(), args_at as *mut u8, args.len());
        let rsp = (args_at & !15) - 8;

        let alt = libc::stack_t { ss_sp: alt_stack.as_mut_ptr().cast(), ss_flags: 0, ss_size: alt_stack.len() };
        libc::sigaltstack(&alt, std::ptr::null_mut());
        for (signal, handler) in
            [(libc::SIGTRAP, on_trap as *const () as usize), (libc::SIGSEGV, on_fault as *const () as usize)]
        {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
        std::arch::asm!(
            "mov rsp, {sp}",
            "jmp {entry}",
            sp = in(reg) rsp,
            entry = in(reg) entry,
            in("rdi") args_at,
            in("rsi") args.len(),
            options(noreturn)
        );
    }
}

/// A program running in a child, its console and reports read into `output`.
struct Running {
    /// The process forked by the test (its child, to reap).
    first: i32,
    /// The process running the program now (after a restore, a checkpoint's copy).
    child: i32,
    output: Arc<Mutex<String>>,
}

impl Running {
    fn start(name: &str, args: &str) -> Self {
        Self::start_bytes(name, args.as_bytes())
    }

    /// As [`Running::start`], with an argument string of any bytes (the kernel hands UTF-8
    /// only; the runtime checks anyway).
    fn start_bytes(name: &str, args: &[u8]) -> Self {
        let app = vmm::apps::embedded(name).unwrap_or_else(|| panic!("{name} is not embedded"));
        let (segments, entry) = segments(app.elf);
        let mut fds = [0; 2];
        // SAFETY: a pipe, its two ends in `fds`.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // Everything the child needs is allocated before the fork: another test's thread may
        // hold the allocator's lock at that moment, and the child would wait for it forever.
        let mut alt_stack = vec![0u8; 1 << 16];
        // SAFETY: the child runs `run_child` only, which never returns.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: a child just forked.
            unsafe {
                libc::close(fds[0]);
                run_child(&segments, entry, args, fds[1], &mut alt_stack)
            }
        }
        assert!(child > 0, "fork failed");
        // SAFETY: the write end is the child's now.
        unsafe { libc::close(fds[1]) };
        let output = Arc::new(Mutex::new(String::new()));
        let sink = output.clone();
        // SAFETY: the read end, owned by this File from now on.
        let mut pipe = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Running { first: child, child, output }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until the output satisfies `done`; its text.
    fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let out = self.output();
            if done(&out) {
                return out;
            }
            assert!(Instant::now() < deadline, "no {what} in:\n{out}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The copies that checkpoints made (the last is the one a crash restores).
    fn snapshots(&self) -> Vec<i32> {
        self.output().lines().filter_map(|l| l.strip_prefix("snapshot ")?.parse().ok()).collect()
    }

    /// A crash: the running process dies, and the copy of its last checkpoint goes on.
    fn crash_and_restore(&mut self) {
        let last = *self.snapshots().last().expect("a checkpoint before the crash");
        // SAFETY: the program's process, started by this test.
        unsafe { libc::kill(self.child, libc::SIGKILL) };
        // The copy must have stopped itself, or the SIGCONT would come before its SIGSTOP.
        let stat = format!("/proc/{last}/stat");
        let deadline = Instant::now() + PATIENCE;
        while !std::fs::read_to_string(&stat).unwrap_or_default().contains(") T ") {
            assert!(Instant::now() < deadline, "the checkpoint's copy {last} never stopped");
            std::thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: the checkpoint's copy, made by this test's child.
        unsafe { libc::kill(last, libc::SIGCONT) };
        self.child = last;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let pids: BTreeSet<i32> = self.snapshots().into_iter().chain([self.child]).collect();
        for pid in pids {
            // SAFETY: processes this test started (the child and the copies it forked).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // SAFETY: reaps the test's own child (the copies it forked are reparented when it dies).
        unsafe { libc::waitpid(self.first, std::ptr::null_mut(), 0) };
    }
}

/// The reports of `name` in `out`: (progress, checksum, check).
fn reports(out: &str, name: &str) -> Vec<(u64, u64, u64)> {
    let prefix = format!("report {name} ");
    out.lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix(&prefix)?.split(' ').map(|v| v.parse::<u64>().ok());
            Some((f.next()??, f.next()??, f.next()??))
        })
        .collect()
}

#[test]
fn counter_counts_reports_and_shuts_down_when_its_command_line_says() {
    let run = Running::start("counter", "apps=counter counter_shutdown=3 run_ms=100");
    let out = run.wait_for("resume after the shutdown", |o| o.contains("counter: resumed after the shutdown at"));
    assert!(out.lines().any(|l| l.strip_prefix("counter: ").is_some_and(|n| n.parse::<u64>().is_ok())), "{out}");
    assert!(out.contains("counter: shutting the machine down at"), "{out}");
    let r = reports(&out, "counter");
    assert!(r.len() >= 3 && r.windows(2).all(|w| w[0].0 < w[1].0), "{r:?}");
    assert!(r.iter().all(|&(p, c, check)| p == c && check == 0), "{r:?}");
}

#[test]
fn kv_takes_its_seed_and_table_from_the_command_line_and_verifies() {
    let run = Running::start("kv", "kv_seed=7 kv_pages=8 kv_verify_every=1");
    let out = run.wait_for("three reports", |o| reports(o, "kv").len() >= 3);
    assert!(out.contains(", seed 7\n"), "{out}");
    assert!(out.contains("table verified"), "{out}");
    assert!(reports(&out, "kv").iter().all(|r| r.2 == 1), "every report verifies: {out}");
}

#[test]
fn memtouch_maps_what_its_command_line_says() {
    let run = Running::start("memtouch", "apps=memtouch memtouch=3,8,8 memtouch_ms=10");
    let out = run.wait_for("two reports", |o| reports(o, "memtouch").len() >= 2);
    assert!(out.contains("memtouch: 3 regions of 8 KiB, 8 KiB dirtied every 10 ms\n"), "{out}");
}

#[test]
fn fault_writes_to_kernel_memory_and_is_killed() {
    let run = Running::start("fault", "fault_ms=10");
    let out = run.wait_for("the kill", |o| o.contains("process killed"));
    assert!(out.contains("fault: writing to kernel memory\n"), "{out}");
    assert!(out.contains(&format!("fault at {:#x}", nvram::layout::ROOT_HEADER)), "{out}");
    assert!(!out.contains("went through"), "{out}");
    assert_eq!(reports(&out, "fault"), [(1, 0, 0)]);
}

#[test]
fn churn_runs_into_the_limits_and_verifies_every_report() {
    let run = Running::start("churn", "churn_seed=3 churn_ops=3000 churn_pages=16");
    let out = run.wait_for("three reports", |o| reports(o, "churn").len() >= 3);
    assert!(out.starts_with("churn: seed 3, 3000 operations, regions of 1 to 16 pages\n"), "{out}");
    assert!(out.contains("all verified"), "{out}");
    assert!(reports(&out, "churn").iter().all(|r| r.2 == 1), "{out}");
}

#[test]
fn deleter_finds_its_deleted_region_back_after_a_crash_to_its_checkpoint() {
    let mut run = Running::start("deleter", "apps=deleter");
    run.wait_for("the deletion", |o| reports(o, "deleter").iter().any(|r| r.0 == 1));
    let before = run.output();
    assert!(before.contains("deleter: region deleted after the checkpoint; "), "{before}");
    run.crash_and_restore();
    let out = run.wait_for("the restored report", |o| reports(o, "deleter").iter().any(|r| r.0 == 2));
    assert!(out.contains("deleter: restored; the deleted region is back intact\n"), "{out}");
    assert!(reports(&out, "deleter").iter().filter(|r| r.0 == 2).all(|r| r.2 == 1), "{out}");
}

#[test]
fn deleter_in_bulk_restores_the_second_checkpoint_whole() {
    let mut run = Running::start("deleter", "deleter=40");
    run.wait_for("the deletions", |o| o.contains("40 regions deleted and made again"));
    assert_eq!(run.snapshots().len(), 2, "{}", run.output());
    run.crash_and_restore();
    let out = run.wait_for("the check", |o| o.contains("regions differ"));
    assert!(out.contains("deleter: restored; 0 of 40 regions differ from the checkpoint\n"), "{out}");
}

#[test]
fn an_argument_string_that_is_not_utf8_is_refused_with_a_message_not_a_panic() {
    let run = Running::start_bytes("counter", b"counter_shutdown=1 \xff\xfe");
    let out = run.wait_for("the exit", |o| o.contains("process exited"));
    assert_eq!(
        out, "user-rt: the argument string is not UTF-8 (from byte 19)\nprocess exited with code 102\n",
        "{out}"
    );
}
