//! The persistent guest kernel of the NVM machine.
//!
//! Booted by the PVH protocol ([`arch::boot`]), it keeps everything that must outlive a
//! boot in NVM, reachable from the root header ([`nvm::root`]): Tender's memory-resource
//! tables ([`nvm::resources`]), the frame allocator and the process table. Its own
//! `.data`/`.bss` are scratch for one boot, since the loader writes the kernel image anew at
//! every boot. User programs, ELF files handed over as boot modules ([`proc::load`]), run
//! in ring 3, preempted by the timer ([`arch::timer`], [`proc::process`]), and report to
//! the VMM through the machine-control device ([`dev::control`]).
//!
//! The kernel is in layers, each using only those below it (`LAYERS.md`, checked by
//! `scripts/check-layers.sh`): `arch`, `dev`, `nvm`, `plate`, `proc`, and this file, which
//! reads the command line (`nvram::cmdline`, the very parser the VMM checks it with),
//! decides how the boot goes on and installs what the lower layers call back: the
//! fatal-path hook of `arch`.
#![no_std]
#![no_main]

mod arch;
mod dev;
mod nvm;
mod plate;
mod proc;

use arch::{gdt, interrupts, paging, pvh, ring3, timer};
use dev::{console, control, engine, machine, persist};
use nvm::root as nvm_root;
use nvram::cmdline::{Cmdline, Fault};
use nvram::control::BootKind;
use nvram::exit::ExitCode;
use nvram::header::ShutdownFlag;
use proc::boot;

/// Finds the virtio disk, says what it is, and runs the `disk_test` check on it if asked.
fn open_disk(test_sectors: u64) {
    use dev::virtio::{self, TestOutcome};
    let mut blk = match virtio::open() {
        None => return,
        Some(Err(e)) => return println!("virtio-blk: the disk cannot be used: {e}"),
        Some(Ok(blk)) => blk,
    };
    let sectors = blk.capacity();
    println!(
        "virtio-blk: disk of {sectors} sectors ({} KiB) at {:#x}, read-only {}",
        sectors / 2,
        nvram::mmio::VIRTIO_BLK_BASE,
        blk.readonly()
    );
    if test_sectors > 0 {
        let seed = timer::rdtsc() & 0xffff_ffff;
        match virtio::self_test(&mut blk, test_sectors as usize, seed) {
            TestOutcome::Passed { first_sector } => println!(
                "virtio-blk: disk test passed: {test_sectors} sectors from {first_sector} written, flushed and read back (seed {seed:#x})"
            ),
            TestOutcome::TooSmall => println!("virtio-blk: disk test FAILED: the disk is smaller than the test"),
            TestOutcome::Mismatch { word } => println!("virtio-blk: disk test FAILED: word {word} read back wrong"),
            TestOutcome::Failed(e) => println!("virtio-blk: disk test FAILED: {e}"),
        }
    }
    virtio::keep(blk);
}

/// The memory map, a line a region: one print for all of them, since each print costs a
/// trip to CPL 3 and a VM exit (`dev::console`).
struct MemoryMap(&'static [nvram::pvh::MemoryRegion]);

impl core::fmt::Display for MemoryMap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut regions = self.0.iter().filter(|r| r.size != 0).peekable();
        while let Some(r) = regions.next() {
            write!(f, "  memory {:#012x}-{:#012x} {}", r.addr, r.addr + r.size, r.kind_name())?;
            if regions.peek().is_some() {
                f.write_str("\n")?;
            }
        }
        Ok(())
    }
}

/// Rust entry, called by the boot code in long mode with `start_info` the physical address
/// of the PVH `hvm_start_info`.
#[no_mangle]
extern "C" fn kmain(start_info: u64) -> ! {
    arch::set_fatal_hook(stop);
    gdt::init();
    interrupts::init();
    paging::init();
    // Before the first print: printing formats at CPL 3 and hands the text to the
    // machine-control device when there is one (`dev::console`), and the UART is
    // configured only without it.
    ring3::init(true);
    let tsc_khz = control::init();
    console::init();

    // The boot up to the plate function's decision is kernel work as its bookkeeping is:
    // computation over the start info and NVM's tables, and prints. It runs at CPL 3
    // (`arch::ring3`), in two runs; what needs kernel mode (ports) goes through privileged
    // calls. In kernel mode, under PVM, it was most of a restore's boot: the command line's
    // parse 0.3 ms, opening NVM 1.3 ms, and each print 0.2 to 0.6 ms (a run of its own).
    // With `bookkeeping=ring0` the second run, and what follows, stay in kernel mode.
    let (info, cmdline, mut nvm) = ring3::run(|| {
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
        println!("command line: \"{}\"\n{}", info.cmdline, MemoryMap(info.memory_map));
        let cmdline = Cmdline::parse(info.cmdline, |item| println!("ignoring unknown command-line item \"{item}\""));
        let (flush, announce) = persist::init(cmdline.flush);
        let nvm = nvm_root::open(info.ram_end()).unwrap_or_else(|e| nvm_root::refuse(e));
        println!(
            "NVM: {} MiB, boot {} of this image, cache flush by {}{}",
            info.ram_end() >> 20,
            nvm.header.boot_count,
            flush.name(),
            if announce { ", barriers announced to the machine" } else { "" }
        );
        (info, cmdline, nvm)
    });
    ring3::init(cmdline.bookkeeping_ring3);
    let on_disk = cmdline.plate && cmdline.plate_store_disk;
    let (areas, kind, restore_from) = ring3::run(|| {
        let copier = if engine::init(cmdline.plate_copy_engine) { "copy engine" } else { "CPU" };
        plate::plant::set(cmdline.test_plant);
        plate::set_sums(cmdline.sums);
        if plate::plant::active() {
            println!("plate: TEST KNOB: a bug is planted in the write-outs ({:?})", cmdline.test_plant);
        }
        open_disk(cmdline.disk_test);
        if cmdline.plate {
            let mode = if ring3::enabled() { "at CPL 3" } else { "in kernel mode" };
            // The disk's store reads and writes its save areas through the disk driver.
            let copier = if cmdline.plate_store_disk { "the virtio disk" } else { copier };
            let sums = if cmdline.sums { "" } else { ", with no content sums (sums=off)" };
            println!("plate: write-outs and restores copy by {copier}, their bookkeeping runs {mode}{sums}");
        }
        let mut areas = plate::Areas::take(nvm.frames.frames());
        let (kind, restore_from) = if on_disk {
            // The volatile plate function: what RAM holds is never used (volatile RAM holds
            // nothing anyway); the state comes from the disk's last commit (`start_from_disk`).
            if nvm.found != nvm_root::Found::Blank {
                println!("NVM: plate_store=disk: RAM's contents are not used; the state comes from the disk");
            }
            nvm.format();
            (BootKind::Cold, None)
        } else {
            decide(&mut nvm, cmdline.plate.then_some(&mut areas))
        };
        (areas, kind, restore_from)
    });

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

    if on_disk {
        start_from_disk(nvm, areas, &cmdline, &info, tsc_khz)
    }
    start(nvm, areas, kind, restore_from, &cmdline, &info, tsc_khz)
}

/// Stops the machine over a disk that cannot be the plate store.
fn refuse_disk(why: core::fmt::Arguments) -> ! {
    println!("plate: refusing the disk as the plate store: {why}");
    machine::exit(ExitCode::BadDisk)
}

/// `plate_store=disk`: opens the disk's plate store (a blank disk is formatted and the
/// machine starts afresh, committing generation 1 at its first write-out), else restores
/// its last commit into the freshly formatted RAM, whatever ended the previous run: a crash
/// or a graceful shutdown alike (the paper's volatile plate function restores the last
/// save). Then hands over as [`start`] does.
fn start_from_disk(
    nvm: nvm_root::Nvm,
    areas: plate::Areas,
    cmdline: &Cmdline,
    info: &pvh::BootInfo,
    tsc_khz: u64,
) -> ! {
    use plate::disk::Outcome;
    let (store, formatted) = plate::disk::open().unwrap_or_else(|e| refuse_disk(format_args!("{e}")));
    let area_kib = store_area_kib(&store);
    let (kind, plating, restored) = if formatted {
        println!("plate: blank disk: the plate store is formatted ({area_kib} KiB of area space); starting afresh");
        (BootKind::Cold, plate::format(areas, plate::Store::Disk(store)), None)
    } else {
        if let Err(e) = plate::disk::read_slots() {
            refuse_disk(format_args!("{e}"))
        }
        match plate::disk::restore(areas, store) {
            Outcome::Restored(mut plating, metrics, choice) => {
                say_passed_over(&choice);
                let generation = metrics.generation;
                if choice.damaged() {
                    println!("plate: ROLLING BACK to generation {generation}: the newer commit on the disk is damaged (above)");
                }
                println!("plate: restoring the disk's write-out of generation {generation} into fresh RAM");
                if let Err(e) = nvm.check() {
                    refuse_disk(format_args!("the restored tables do not check out: {e}"))
                }
                let bitmap_pages = (kernel_core::frames::words_for(nvm.frames.frames()) as u64 * 8).div_ceil(4096);
                let fixed = nvram::plate::FIXED_FRAME_BITMAP;
                let kind = nvram::plate::PlateKind::Fixed as u32;
                let saved = plating.live.plates().iter().find(|p| p.kind == kind && p.id == fixed).map(|p| p.pages);
                if saved.is_some_and(|pages| pages != bitmap_pages) {
                    refuse_disk(format_args!("the disk's commit was made by a machine of another RAM size"))
                }
                if cmdline.check {
                    plate::check_restored(&mut plating, nvm.resources, &nvm.frames);
                }
                (BootKind::Restored, plating, Some(metrics))
            }
            Outcome::Refused(areas, store, choice) => {
                say_passed_over(&choice);
                if choice.damaged() || choice.rejected.iter().flatten().any(|r| !is_blank(r)) {
                    refuse_disk(format_args!(
                        "no commit slot on the disk can be restored intact (the reasons are above)"
                    ))
                }
                println!("plate: the disk's plate store holds no commit yet: starting afresh");
                (BootKind::Cold, plate::format(areas, plate::Store::Disk(store)), None)
            }
        }
    };
    let nvm_root::Nvm { header, resources, frames, .. } = nvm;
    timer::set_hz(timer::hz_for_interval(cmdline.checkpoint_ms));
    let checkpoint_ns = cmdline.checkpoint_ms.map_or(0, |ms| ms.saturating_mul(1_000_000));
    // At CPL 3, as the boot before it (`kmain`): bookkeeping and a print.
    ring3::run(|| boot::install(header, resources, frames, Some(plating), checkpoint_ns, restored));
    // SAFETY: the entries come from the start info's module list.
    let modules = info.modules.iter().map(|entry| unsafe { proc::load::Module::new(entry, info.cmdline) });
    boot::run(kind, modules, tsc_khz, cmdline.run_ms)
}

fn store_area_kib(store: &plate::DiskStore) -> u64 {
    store.area_pages() * 4
}

/// A slot never written (a formatted store's): its header is zeros.
fn is_blank(r: &nvram::plate_check::Rejection) -> bool {
    matches!(r, nvram::plate_check::Rejection::Table(nvram::plate::TableError::BadMagic))
}

/// Says on the console why each commit slot on the disk was passed over (a torn slot only
/// when it mattered).
fn say_passed_over(choice: &nvram::plate_check::Choice) {
    for (slot, why) in choice.rejected.iter().enumerate() {
        let Some(why) = why else { continue };
        if choice.damaged() || choice.index.is_none() {
            println!("plate: disk commit slot {slot} (generation {}) passed over: {why}", choice.generations[slot]);
        }
    }
}

/// Prepares the plate function as the boot's kind requires (restores a crashed run's
/// checkpoint), and hands over to the processes' layer (`proc::boot`), which installs the
/// kernel state, starts (or resumes) the workloads and the timer, and enters the first
/// process (or the idle loop). `restore_from`: the slot to restore and the generations it
/// rolls back (see [`decide`]).
fn start(
    mut nvm: nvm_root::Nvm,
    areas: plate::Areas,
    kind: BootKind,
    restore_from: Option<(usize, u32)>,
    cmdline: &Cmdline,
    info: &pvh::BootInfo,
    tsc_khz: u64,
) -> ! {
    let areas = if cmdline.plate {
        Some(areas)
    } else {
        // This run changes the tables without plates: the plate function's tables and
        // commits no longer describe them (see `plate::forget`).
        plate::forget(areas, (kind == BootKind::Resumed).then_some(&mut nvm.frames));
        None
    };
    let (plating, restored) = match (kind, areas, restore_from) {
        (BootKind::Restored, Some(areas), Some((index, rolled_back))) => {
            // Restore first: it rewrites the very tables the kernel state points into.
            let (mut plating, metrics) = plate::restore(areas, index, rolled_back, nvm.resources, cmdline.restore_lazy);
            if let Err(e) = nvm.check() {
                nvm_root::refuse(e);
            }
            if cmdline.check {
                plate::check_restored(&mut plating, nvm.resources, &nvm.frames);
            }
            (Some(plating), Some(metrics))
        }
        (BootKind::Resumed, Some(areas), _) => {
            let plating = plate::resume(areas).unwrap_or_else(|areas| {
                println!("plate: no live plate table to resume: the plate function starts afresh");
                plate::format(areas, plate::Store::Nvm)
            });
            (Some(plating), None)
        }
        (_, Some(areas), _) => (Some(plate::format(areas, plate::Store::Nvm)), None),
        (_, None, _) => (None, None),
    };
    let nvm_root::Nvm { header, resources, frames, .. } = nvm;
    // Before any conversion to ticks: a write-out every millisecond needs a finer timer.
    timer::set_hz(timer::hz_for_interval(cmdline.checkpoint_ms));
    let checkpoint_ns = cmdline.checkpoint_ms.map_or(0, |ms| ms.saturating_mul(1_000_000));
    // At CPL 3, as the boot before it (`kmain`): bookkeeping and a print.
    ring3::run(|| boot::install(header, resources, frames, plating, checkpoint_ns, restored));
    // SAFETY: the entries come from the start info's module list.
    let modules = info.modules.iter().map(|entry| unsafe { proc::load::Module::new(entry, info.cmdline) });
    boot::run(kind, modules, tsc_khz, cmdline.run_ms)
}

/// Decides from what NVM holds how this boot goes on, and prepares the tables for it.
/// After a crash, also which commit slot to restore and how many generations that rolls
/// back behind the root header's; a rollback, and every commit passed over, is said on the
/// console (and in the restore's metrics, for the VMM).
fn decide(nvm: &mut nvm_root::Nvm, areas: Option<&mut plate::Areas>) -> (BootKind, Option<(usize, u32)>) {
    if let (nvm_root::Found::Known(ShutdownFlag::Abnormal), Some(areas)) = (&nvm.found, areas) {
        return decide_restore(nvm, areas);
    }
    let kind = match nvm.found {
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
            Err(e) => nvm_root::refuse(e),
        },
        nvm_root::Found::Known(ShutdownFlag::Abnormal) => {
            println!("NVM: previous run stopped abruptly and nothing was committed: starting afresh (plate=off)");
            nvm.format();
            BootKind::Cold
        }
    };
    (kind, None)
}

/// [`decide`] after a crash, with the plate function on.
fn decide_restore(nvm: &mut nvm_root::Nvm, areas: &mut plate::Areas) -> (BootKind, Option<(usize, u32)>) {
    let recorded = nvm.header.generation;
    let choice = plate::choose(areas);
    let rolled_back = choice.rolled_back(recorded);
    for (slot, why) in choice.rejected.iter().enumerate() {
        let Some(why) = why else { continue };
        // A torn slot is the normal trace of a crash during a commit; say it only when it
        // matters.
        if rolled_back != 0 || choice.damaged() || choice.index.is_none() {
            println!("NVM: commit slot {slot} (generation {}) passed over: {why}", choice.generations[slot]);
        }
    }
    match (choice.index, choice.generation()) {
        (Some(index), Some(generation)) if rolled_back == 0 => {
            println!("NVM: previous run stopped abruptly: restoring the write-out of generation {generation}");
            (BootKind::Restored, Some((index, 0)))
        }
        (Some(index), Some(generation)) => {
            println!(
                "NVM: previous run stopped abruptly: ROLLING BACK to generation {generation}: the root header \
                 records generation {recorded}, and the newer commit is damaged (above); {rolled_back} \
                 generation(s) lost"
            );
            (BootKind::Restored, Some((index, rolled_back.min(u64::from(u32::MAX)) as u32)))
        }
        _ if recorded == 0 && !choice.damaged() => {
            println!("NVM: previous run stopped abruptly and nothing was committed: starting afresh");
            nvm.format();
            (BootKind::Cold, None)
        }
        _ => nvm_root::refuse(nvm_root::ImageError::NoIntactCommit { generation: recorded }),
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
