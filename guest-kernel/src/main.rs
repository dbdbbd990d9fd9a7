//! The persistent guest kernel of the NVM machine.
//!
//! Booted by the PVH protocol ([`arch::boot`]), it keeps everything that must outlive a
//! boot in NVM, reachable from the root header ([`nvm::root`]): Tender's memory-resource
//! tables ([`nvm::resources`]), the frame allocator and the process table. Its own
//! `.data`/`.bss` are scratch for one boot, since the loader writes the kernel image anew at
//! every boot. Workloads ([`proc::user`]) run in ring 3, preempted by the timer
//! ([`arch::timer`], [`proc::process`]), and report to the VMM through the machine-control
//! device ([`dev::control`]).
//!
//! The kernel is in layers, each using only those below it (`LAYERS.md`, checked by
//! `scripts/check-layers.sh`): `arch`, `dev`, `nvm`, `plate`, `proc`, and this file (with
//! the command line), which decides how the boot goes on and installs what the lower layers
//! call back: the fatal-path hook of `arch`.
#![no_std]
#![no_main]

mod arch;
mod cmdline;
mod dev;
mod nvm;
mod plate;
mod proc;

use arch::frame::TrapFrame;
use arch::{gdt, interrupts, paging, pvh, ring3, timer};
use cmdline::{App, Cmdline, Fault};
use dev::{console, control, engine, machine, persist};
use kernel_core::process::ProcessTable;
use kernel_core::resources::{KernelSpaceUse, Kind};
use nvm::root as nvm_root;
use nvram::control::{BootKind, Booted};
use nvram::exit::ExitCode;
use nvram::header::ShutdownFlag;
use proc::process::{self, Program};
use proc::{kernel, user};

/// Rust entry, called by the boot code in long mode with `start_info` the physical address
/// of the PVH `hvm_start_info`.
#[no_mangle]
extern "C" fn kmain(start_info: u64) -> ! {
    console::init();
    arch::set_fatal_hook(stop);
    gdt::init();
    interrupts::init();
    paging::init();

    println!(
        "Tender NVM kernel {} (image format {}, build {:016x})",
        env!("CARGO_PKG_VERSION"),
        nvram::header::FORMAT_VERSION,
        nvm_root::BUILD_ID
    );
    // SAFETY: `start_info` is what the boot loader passed in ebx.
    let info = match unsafe { pvh::BootInfo::from_start_info(start_info) } {
        Ok(info) => info,
        Err(e) => panic!("unusable PVH start info: {e}"),
    };
    println!("command line: \"{}\"", info.cmdline);
    for region in info.memory_map.iter().filter(|r| r.size != 0) {
        println!("  memory {:#012x}-{:#012x} {}", region.addr, region.addr + region.size, region.kind_name());
    }
    let cmdline = Cmdline::parse(info.cmdline, |item| println!("ignoring unknown command-line item \"{item}\""));

    let (flush, announce) = persist::init(cmdline.flush);
    let mut nvm = nvm_root::open(info.ram_end()).unwrap_or_else(|e| refuse(e));
    println!(
        "NVM: {} MiB, boot {} of this image, cache flush by {}{}",
        info.ram_end() >> 20,
        nvm.header.boot_count,
        flush.name(),
        if announce { ", barriers announced to the machine" } else { "" }
    );
    ring3::init(cmdline.bookkeeping_ring3);
    let tsc_khz = control::init();
    let copier = if engine::init(cmdline.plate_copy_engine) { "copy engine" } else { "CPU" };
    if cmdline.plate {
        let mode = if ring3::enabled() { "at CPL 3" } else { "in kernel mode" };
        println!("plate: write-outs and restores copy by {copier}, their bookkeeping runs {mode}");
    }
    let areas = cmdline.plate.then(|| plate::Areas::take(nvm.frames.frames()));
    let kind = decide(&mut nvm, areas.as_ref());

    match cmdline.fault {
        Some(Fault::InvalidOpcode) => {
            // SAFETY: deliberately raises #UD to exercise the exception path.
            unsafe { core::arch::asm!("ud2", options(noreturn)) }
        }
        Some(Fault::Page) => {
            // SAFETY: deliberately reads an unmapped address (above the 4 GiB identity map).
            let value = unsafe { core::ptr::read_volatile(0x40_0000_0000 as *const u64) };
            println!("unexpected: read {value:#x} from an unmapped address");
        }
        Some(Fault::Triple) => {
            println!("provoking a triple fault");
            interrupts::triple_fault()
        }
        // SAFETY: deliberately raises #UD at CPL 3 to exercise the fault path of the work.
        Some(Fault::WorkInvalidOpcode) => ring3::run(|| unsafe { core::arch::asm!("ud2", options(noreturn)) }),
        Some(Fault::WorkPanic) => ring3::run(|| panic!("provoked in ring-3 kernel work")),
        None => {}
    }
    if cmdline.poke_ports {
        machine::poke_unknown_ports();
    }
    if cmdline.poweroff {
        if kind == BootKind::Resumed {
            // Nothing ran: the state found is still whole, and the next boot resumes it.
            nvm.header.shutdown_flag = ShutdownFlag::Normal as u32;
            nvm.header.seal();
            nvm_root::store_header(&nvm.header);
        }
        println!("powering off");
        machine::exit(ExitCode::PowerOff);
    }

    start(nvm, areas, kind, &cmdline, tsc_khz)
}

/// Decides how to boot from what NVM holds, installs the kernel state, starts (or resumes)
/// the workloads and the timer, and enters the first process (or the idle loop).
fn start(nvm: nvm_root::Nvm, areas: Option<plate::Areas>, kind: BootKind, cmdline: &Cmdline, tsc_khz: u64) -> ! {
    let (plating, restored) = match (kind, areas) {
        (BootKind::Restored, Some(areas)) => {
            // Restore first: it rewrites the very tables the kernel state points into.
            let Some((plating, metrics)) = plate::restore(areas) else {
                refuse(nvm_root::ImageError::Table(Kind::VirtualSpace))
            };
            if let Err(e) = nvm.check() {
                refuse(e);
            }
            (Some(plating), Some(metrics))
        }
        (BootKind::Resumed, Some(areas)) => (Some(plate::resume(areas).unwrap_or_else(plate::format)), None),
        (_, Some(areas)) => (Some(plate::format(areas)), None),
        (_, None) => (None, None),
    };
    let header = nvm.header;
    let nvm_root::Nvm { resources, frames, .. } = nvm;
    let checkpoint_ticks = cmdline.checkpoint_ms.map_or(0, timer::ms_to_ticks);
    kernel::install(kernel::Kernel {
        header,
        res: resources,
        frames,
        procs: placeholder_procs(),
        current: None,
        ticks: 0,
        plating,
        next_checkpoint: if checkpoint_ticks == 0 { u64::MAX } else { checkpoint_ticks },
        checkpoint_ticks,
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
        control::metrics(metrics);
    }
    kernel::with(|k| {
        if kind == BootKind::Cold {
            let pages = (core::mem::size_of::<ProcessTable>() as u64).div_ceil(4096);
            let space = res_op!(kernel_space.create(&mut k.mem(), pages, KernelSpaceUse::ProcessTable))
                .expect("room for the process table");
            let addr = k.res.kernel_spaces.get(space).map(|s| s.vaddr).expect("just created");
            // SAFETY: the kernel space was just allocated (zeroed) for the table, identity-mapped.
            k.procs = unsafe { &mut *(addr as *mut ProcessTable) };
            k.procs.format(Kind::Process as u32);
            for app in cmdline.apps() {
                let program = program(app, cmdline);
                if let Err(e) = process::spawn(k, &program) {
                    println!("cannot start {}: {e:?}", program.name);
                }
            }
        } else {
            let table = k.res.kernel_spaces.iter().find(|(_, s)| s.usage == KernelSpaceUse::ProcessTable as u32);
            let Some(addr) = table.map(|(_, s)| s.vaddr) else { refuse(nvm_root::ImageError::Table(Kind::Process)) };
            // SAFETY: the kernel space holding the process table, identity-mapped, ours alone.
            k.procs = unsafe { &mut *(addr as *mut ProcessTable) };
            if let Err(e) = k.procs.check(Kind::Process as u32) {
                println!("NVM: process table header {e:?}");
                refuse(nvm_root::ImageError::Table(Kind::Process));
            }
            process::wake_all(k);
            println!("NVM: {} processes to resume", k.procs.live());
        }
        if kind == BootKind::Cold && k.plating.is_some() {
            // Plate-ify everything and commit the initial state: a crash from here on
            // always has a checkpoint to come back to.
            let mut frame = TrapFrame::default();
            match k.write_out(&mut frame, false) {
                Ok(m) => println!(
                    "plate: first write-out committed: {} plates, {} KiB plated, {} KiB copied",
                    m.plates,
                    m.plated_bytes >> 10,
                    m.copied_bytes >> 10
                ),
                Err(e) => println!("plate: first write-out failed: {e:?}"),
            }
        }
        control::booted(Booted::new(kind, k.header.boot_count, k.header.generation));
    });
    timer::init(tsc_khz);
    println!("timer at {} Hz, TSC {} kHz", timer::HZ, timer::tsc_khz());
    if let Some(ms) = cmdline.run_ms {
        machine::power_off_at(timer::ms_to_ticks(ms));
    }
    let mut frame = TrapFrame::default();
    kernel::with(|k| process::schedule(k, &mut frame));
    if frame.cs & 3 == 0 {
        println!("idle");
    }
    interrupts::enter(&frame)
}

/// Decides from what NVM holds how this boot goes on, and prepares the tables for it.
fn decide(nvm: &mut nvm_root::Nvm, areas: Option<&plate::Areas>) -> BootKind {
    match nvm.found {
        nvm_root::Found::Blank => {
            println!("NVM: blank image: formatting (cold boot)");
            nvm.format();
            BootKind::Cold
        }
        nvm_root::Found::Known(ShutdownFlag::Normal) => match nvm.check() {
            Ok(()) => {
                println!("NVM: previous run shut down normally: resuming where it stopped");
                BootKind::Resumed
            }
            Err(e) => refuse(e),
        },
        nvm_root::Found::Known(ShutdownFlag::Abnormal) => match areas.and_then(plate::Areas::committed_generation) {
            Some(generation) => {
                println!("NVM: previous run stopped abruptly: restoring the write-out of generation {generation}");
                BootKind::Restored
            }
            None => {
                println!("NVM: previous run stopped abruptly and nothing was committed: starting afresh");
                nvm.format();
                BootKind::Cold
            }
        },
    }
}

/// Stops the machine over an image this kernel must not use.
fn refuse(e: nvm_root::ImageError) -> ! {
    println!("NVM: refusing this image: {e}");
    println!("NVM: `vmm boot --reformat` starts it afresh (its contents are lost)");
    machine::exit(ExitCode::BadImage);
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

fn program(app: App, cmdline: &Cmdline) -> Program {
    let [regions, kib, dirty] = cmdline.memtouch;
    match app {
        App::Counter => {
            Program { name: "counter", entry: user::counter::main, args: [cmdline.counter_shutdown, 0, 0, 0] }
        }
        App::Kv => Program {
            name: "kv",
            entry: user::kv::main,
            args: [cmdline.kv_seed, cmdline.kv_pages, cmdline.kv_verify_every, 0],
        },
        App::Memtouch => {
            Program { name: "memtouch", entry: user::memtouch::main, args: [regions, kib, dirty, cmdline.memtouch_ms] }
        }
        App::Fault => Program { name: "fault", entry: user::fault::main, args: [cmdline.fault_ms, 0, 0, 0] },
        App::Deleter => Program { name: "deleter", entry: user::deleter::main, args: [0; 4] },
    }
}

/// The fatal-path hook of `arch` (`arch::set_fatal_hook`): prints even if the fault struck
/// while the console was locked, and stops the machine. In ring-3 kernel work the ports are
/// out of reach: both are done in kernel mode.
fn stop(args: core::fmt::Arguments, code: ExitCode) -> ! {
    ring3::privileged(|| {
        console::emergency_print(args);
        machine::exit(code)
    })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    stop(format_args!("\nKERNEL PANIC: {info}\n"), ExitCode::Panic)
}
