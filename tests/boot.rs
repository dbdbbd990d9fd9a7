//! The real guest kernel booted by the real `vmm` binary in KVM: banner, power-off, faults,
//! Ctrl-C, and guest stores that outlive the VMM in the image file.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn boots_prints_the_banner_and_powers_off() {
    let scratch = Scratch::new();
    let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stderr.contains("the guest powered off"), "{out:?}");
    let console = scratch.read_console();
    assert!(console.contains("Tender NVM kernel"), "{console}");
    assert!(console.contains("command line: \"poweroff"), "{console}");
    assert!(console.contains("memory 0x0000100000-0x0002000000 ram"), "32 MiB of RAM in the map:\n{console}");
    assert!(console.contains("blank image: formatting (cold boot)"), "{console}");
    assert!(console.contains("powering off"), "{console}");
    let image = std::fs::metadata(scratch.image()).unwrap();
    assert_eq!(image.len(), 32 << 20);
}

#[test]
fn the_console_goes_to_stdout_by_default() {
    let scratch = Scratch::new();
    let image = scratch.image().display().to_string();
    let out = run(&mut vmm(&["boot", "--nvram", &image, "--mem", "32M", "--cmdline", "poweroff"]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("Tender NVM kernel"), "{out:?}");
}

#[test]
fn guest_stores_survive_the_vmm_in_the_image_file() {
    let scratch = Scratch::new();
    for boot in 1..=3u64 {
        let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT);
        assert_eq!(out.code(), Some(0), "{out:?}");
        let console = scratch.read_console();
        assert!(console.contains(&format!("boot {boot} of this image")), "{console}");
        // The kernel counted the boot in NVM; the VMM is gone, the file holds it.
        let header = read_header(&scratch);
        assert!(header.validate().is_ok(), "{header:?}");
        assert_eq!(header.boot_count, boot);
    }
}

#[test]
fn an_existing_image_keeps_its_size() {
    let scratch = Scratch::new();
    let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let image = scratch.image().display().to_string();
    let console = scratch.console().display().to_string();
    let out = run(&mut vmm(&["boot", "--nvram", &image, "--console", &console, "--cmdline", "poweroff"]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(scratch.read_console().contains("memory 0x0000100000-0x0002000000 ram"));
}

#[test]
fn reformat_starts_the_image_afresh() {
    let scratch = Scratch::new();
    for _ in 0..2 {
        assert_eq!(run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT).code(), Some(0));
    }
    assert_eq!(read_header(&scratch).boot_count, 2);
    let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff")).arg("--reformat"), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(scratch.read_console().contains("cold boot"));
    assert_eq!(read_header(&scratch).boot_count, 1);
}

#[test]
fn a_guest_exception_is_reported_with_its_registers() {
    let scratch = Scratch::new();
    let out = run(vmm(&[]).args(boot_args(&scratch, "fault=ud")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(4), "{out:?}");
    assert!(out.stderr.contains("stopped on a CPU exception"), "{out:?}");
    let console = scratch.read_console();
    assert!(console.contains("KERNEL FAULT: invalid opcode (vector 6"), "{console}");
    assert!(console.contains("rip 0x"), "{console}");

    let out = run(vmm(&[]).args(boot_args(&scratch, "fault=pf")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(4), "{out:?}");
    assert!(scratch.read_console().contains("page fault (vector 14, error code 0x0, cr2 0x4000000000)"));
}

/// The plate function's bookkeeping runs at CPL 3 (`ring3` in the guest): a fault or a
/// panic there is the kernel's, reported as such, not a process to kill.
#[test]
fn a_fault_in_ring_3_kernel_work_stops_the_machine_with_its_registers() {
    let scratch = Scratch::new();
    let out = run(vmm(&[]).args(boot_args(&scratch, "fault=work-ud")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(4), "{out:?}");
    let console = scratch.read_console();
    assert!(console.contains("KERNEL FAULT in ring-3 kernel work: invalid opcode (vector 6"), "{console}");
    assert!(console.contains("cs 0x0033"), "the work ran at CPL 3: {console}");
    assert!(console.contains("their bookkeeping runs at CPL 3"), "{console}");
    assert!(!console.contains("killed"), "{console}");

    let out = run(vmm(&[]).args(boot_args(&scratch, "fault=work-panic")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert!(out.stderr.contains("the guest kernel panicked"), "{out:?}");
    assert!(scratch.read_console().contains("KERNEL PANIC: panicked at"), "{}", scratch.read_console());
    assert!(scratch.read_console().contains("provoked in ring-3 kernel work"), "{}", scratch.read_console());
}

#[test]
fn a_triple_fault_is_reported_with_the_vcpu_registers() {
    let scratch = Scratch::new();
    let out = run(vmm(&[]).args(boot_args(&scratch, "fault=triple")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(4), "{out:?}");
    assert!(out.stderr.contains("the guest triple-faulted"), "{out:?}");
    assert!(out.stderr.contains("rip 0x") && out.stderr.contains("cr3 0x"), "{out:?}");
    assert!(!out.stderr.contains("panicked"), "{out:?}");
}

#[test]
fn a_guest_poking_unknown_ports_does_not_harm_the_vmm() {
    let scratch = Scratch::new();
    let out = run(vmm(&[]).args(boot_args(&scratch, "poke-ports poweroff")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(scratch.read_console().contains("unknown ports poked: reads all ones"));
}

#[test]
fn ctrl_c_and_sigterm_shut_the_machine_down_gracefully() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let scratch = Scratch::new();
        let child = vmm(&[])
            .args(boot_args(&scratch, ""))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        wait_for_text(&scratch.console(), "idle", BOOT_LIMIT);
        // SAFETY: sends a signal to our own child process.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let out = wait(child, Duration::from_secs(10));
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert!(out.stderr.contains("asking the guest to shut down"), "{out:?}");
        assert!(out.stderr.contains("the guest powered off"), "{out:?}");
        assert!(scratch.read_console().contains("shut down: the machine's state is kept in NVM"));
    }
}

#[test]
fn a_second_vmm_on_a_locked_image_is_refused() {
    let scratch = Scratch::new();
    let first = vmm(&[]).args(boot_args(&scratch, "")).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_text(&scratch.console(), "idle", BOOT_LIMIT);
    let second_console = scratch.path("second.log").display().to_string();
    let image = scratch.image().display().to_string();
    let out =
        run(&mut vmm(&["boot", "--nvram", &image, "--console", &second_console, "--cmdline", "poweroff"]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("is in use by another VMM"), "{out:?}");
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    assert_eq!(wait(first, Duration::from_secs(10)).code(), Some(0));
    // Once the first VMM is gone, the image boots again.
    assert_eq!(run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT).code(), Some(0));
}
