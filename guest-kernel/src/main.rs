//! The persistent guest kernel of the NVM machine.
//!
//! Booted by the PVH protocol ([`boot`]), it keeps everything that must outlive a boot in
//! NVM, reachable from the root header ([`image`]); its own `.data`/`.bss` are scratch for
//! one boot, since the loader writes the kernel image anew at every boot.
#![no_std]
#![no_main]

mod boot;
mod cmdline;
pub mod console;
mod gdt;
mod image;
mod interrupts;
mod machine;
mod persist;
mod pvh;

use cmdline::{Cmdline, Fault};
use image::BootKind;
use nvram::exit::ExitCode;

/// Rust entry, called by the boot code in long mode with `start_info` the physical address
/// of the PVH `hvm_start_info`.
#[no_mangle]
extern "C" fn kmain(start_info: u64) -> ! {
    console::init();
    gdt::init();
    interrupts::init();

    println!("Tender NVM kernel {} (image format {})", env!("CARGO_PKG_VERSION"), nvram::header::FORMAT_VERSION);
    // SAFETY: `start_info` is what the boot loader passed in ebx.
    let info = match unsafe { pvh::BootInfo::from_start_info(start_info) } {
        Ok(info) => info,
        Err(e) => panic!("unusable PVH start info: {e}"),
    };
    println!("command line: \"{}\"", info.cmdline);
    for region in info.memory_map {
        println!("  memory {:#012x}-{:#012x} {}", region.addr, region.addr + region.size, region.kind_name());
    }
    let cmdline = Cmdline::parse(info.cmdline, |item| println!("ignoring unknown command-line item \"{item}\""));

    let flush = persist::init(cmdline.flush);
    let header = match image::open() {
        Ok((kind, header)) => {
            let how = match kind {
                BootKind::Cold => "cold boot: blank image formatted",
                BootKind::Known(nvram::header::ShutdownFlag::Normal) => "previous run shut down normally",
                BootKind::Known(nvram::header::ShutdownFlag::Abnormal) => "previous run stopped abruptly",
            };
            println!("NVM: {} MiB, {how}", info.ram_end() >> 20);
            header
        }
        Err(e) => {
            println!("NVM: refusing this image: {e}");
            println!("NVM: `vmm boot --reformat` starts it afresh (its contents are lost)");
            machine::exit(ExitCode::BadImage);
        }
    };
    println!("boot {} of this image, cache flush by {}", header.boot_count, flush.name());

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
        Some(Fault::Triple) => interrupts::triple_fault(),
        None => {}
    }

    if cmdline.poke_ports {
        machine::poke_unknown_ports();
    }
    if cmdline.poweroff {
        println!("powering off");
        machine::exit(ExitCode::PowerOff);
    }
    println!("idle");
    machine::halt_forever()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    console::emergency_print(format_args!("\nKERNEL PANIC: {info}\n"));
    machine::exit(ExitCode::Panic)
}
