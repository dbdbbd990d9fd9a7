//! The kernel's start, once `main.rs` has decided how this boot goes on: installs the
//! kernel's state, finds (or makes) the process table, starts the workloads of a cold boot,
//! commits the first write-out, starts the timer and enters the first process.

use kernel_core::frames::FrameBitmap;
use kernel_core::process::ProcessTable;
use nvram::control::{BootKind, Booted, Metrics};
use nvram::header::RootHeader;
use nvram::resources::{KernelSpaceUse, Kind, Resources};

use crate::arch::frame::TrapFrame;
use crate::arch::{interrupts, paging, timer};
use crate::dev::{control, machine};
use crate::nvm::root::{self, ImageError};
use crate::plate::{self, Plating, WriteOutError};
use crate::println;
use crate::proc::kernel::{self, Kernel};
use crate::proc::load::{self, Module};
use crate::proc::process;
use crate::res_op;

/// Installs the kernel's state for this boot. `restored`: the metrics of the restore this
/// boot made, whose pending save areas are freed now that the restored frame bitmap is in.
pub fn install(
    header: RootHeader,
    res: &'static mut Resources,
    frames: FrameBitmap<'static>,
    plating: Option<Plating>,
    checkpoint_ns: u64,
    restored: Option<Metrics>,
) {
    kernel::install(Kernel {
        header,
        res,
        frames,
        procs: placeholder_procs(),
        current: None,
        ticks: 0,
        plating,
        next_checkpoint_ns: if checkpoint_ns == 0 { u64::MAX } else { checkpoint_ns },
        checkpoint_ns,
        entered_first: false,
    });
    if let Some(metrics) = restored {
        kernel::with(|k| {
            if let Some(plating) = k.plating.as_mut() {
                plate::free_pending_after_restore(plating, &mut k.frames);
            }
            k.header.generation = metrics.generation;
        });
        println!(
            "NVM: restored generation {}: {} plates, {} KiB copied",
            metrics.generation,
            metrics.plates,
            metrics.copied_bytes >> 10
        );
        control::metrics(&metrics);
    }
}

/// Starts (a cold boot: the programs in `modules`) or resumes the processes and the timer,
/// and enters the first process (or the idle loop). `run_ms`: power off after that long.
pub fn run(kind: BootKind, modules: impl Iterator<Item = Module>, tsc_khz: u64, run_ms: Option<u64>) -> ! {
    kernel::with(|k| {
        if kind == BootKind::Cold {
            let pages = (core::mem::size_of::<ProcessTable>() as u64).div_ceil(4096);
            let space = res_op!(kernel_space.create(&mut k.mem(), pages, KernelSpaceUse::ProcessTable))
                .expect("room for the process table");
            let addr = k.res.kernel_spaces.get(space).map(|s| s.vaddr).expect("just created");
            // SAFETY: the kernel space was just allocated (zeroed) for the table, identity-mapped.
            k.procs = unsafe { &mut *(addr as *mut ProcessTable) };
            k.procs.format(Kind::Process as u32);
            for module in modules {
                load::start(k, &module);
            }
        } else {
            // Computation over the tables and prints: at CPL 3 (see `arch::ring3`), one run
            // instead of one per print.
            crate::arch::ring3::run(|| {
                let table = k.res.kernel_spaces.iter().find(|(_, s)| s.usage == KernelSpaceUse::ProcessTable as u32);
                let Some(addr) = table.map(|(_, s)| s.vaddr) else { root::refuse(ImageError::Table(Kind::Process)) };
                // SAFETY: the kernel space holding the process table, identity-mapped, ours alone.
                k.procs = unsafe { &mut *(addr as *mut ProcessTable) };
                if let Err(e) = k.procs.check(Kind::Process as u32) {
                    println!("NVM: process table header {e:?}");
                    root::refuse(ImageError::Table(Kind::Process));
                }
                process::wake_all(k);
                paging::refresh_kernel_entries(k.res.spaces.iter().map(|(_, s)| s.root));
                let ignored = modules.count();
                if ignored > 0 {
                    println!("{ignored} boot modules ignored: the image holds its programs already");
                }
                println!("NVM: {} processes to resume", k.procs.live());
            });
        }
        if kind == BootKind::Cold && k.plating.is_some() {
            // Plate-ify everything and commit the initial state: a crash from here on
            // always has a checkpoint to come back to.
            let mut frame = TrapFrame::default();
            control::set_cause(nvram::control::Cause::Boot);
            match k.write_out(&mut frame, false) {
                Ok(m) => println!(
                    "plate: first write-out committed: {} plates, {} KiB plated, {} KiB copied",
                    m.plates,
                    m.plated_bytes >> 10,
                    m.copied_bytes >> 10
                ),
                Err(WriteOutError::NoRoom) if k.plating.as_ref().is_some_and(Plating::on_disk) => {
                    println!(
                        "plate: refusing the disk as the plate store: its area space cannot hold the save areas of \
                         the plates (a disk of {} KiB needs more; two areas per plate)",
                        plate::disk::capacity_kib()
                    );
                    machine::exit(nvram::exit::ExitCode::BadDisk)
                }
                Err(e) => println!("plate: first write-out failed: {e:?}"),
            }
        }
        let booted = Booted::new(kind, k.header.boot_count, k.header.generation);
        control::booted(booted.with_work_runs(crate::arch::ring3::runs()));
    });
    timer::init(tsc_khz);
    println!("timer at {} Hz, TSC {} kHz", timer::hz(), timer::tsc_khz());
    if let Some(ms) = run_ms {
        machine::power_off_at(timer::ms_to_ticks(ms));
    }
    let mut frame = TrapFrame::default();
    kernel::with(|k| {
        // After a restore, the process the committed write-out was made for runs first.
        let first = match kind {
            BootKind::Restored => k.plating.as_ref().and_then(|p| p.live.resume_first.checked_sub(1)),
            _ => None,
        };
        process::schedule_first(k, &mut frame, first)
    });
    if frame.cs & 3 == 0 {
        println!("idle");
    }
    interrupts::enter(&frame)
}

/// Until the process table's kernel space exists, an empty table in scratch memory.
/// Once per boot (a second call panics): it hands out a `&'static mut` to a static.
fn placeholder_procs() -> &'static mut ProcessTable {
    static mut EMPTY: core::mem::MaybeUninit<ProcessTable> = core::mem::MaybeUninit::zeroed();
    static TAKEN: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
    assert!(!TAKEN.swap(true, core::sync::atomic::Ordering::Relaxed), "one placeholder per boot");
    // SAFETY: `TAKEN` makes this the only reference to `EMPTY`, taken at boot before the
    // real table replaces it; all-zero is a valid (empty, unformatted) table.
    unsafe { &mut *(&raw mut EMPTY).cast::<ProcessTable>() }
}
