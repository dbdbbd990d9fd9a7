//! User programs given as ELF files (`vmm boot --app`): hostile files are refused one by
//! one, on the console and in the machine's status, while the machine runs its other
//! programs; programs are part of the image, so an image that will resume or restore
//! takes none.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{machine_config, vmm, Scratch};
use nvram::program::ProgramError;
use vmm::{harness, ProgramFile};

/// The bundled `counter`'s ELF file: a real program to break.
fn counter_elf() -> Vec<u8> {
    vmm::apps::embedded("counter").expect("the VMM bundles counter").elf.to_vec()
}

fn put_u16(elf: &mut [u8], at: usize, v: u16) {
    elf[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(elf: &mut [u8], at: usize, v: u64) {
    elf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Offset of program header `i`'s field at `field` (ELF64: the table at `e_phoff`, 56
/// bytes an entry; `p_vaddr` at 16, `p_memsz` at 40).
fn phdr(elf: &[u8], i: usize, field: usize) -> usize {
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    phoff + i * 56 + field
}

/// Every kind of bad file, with the refusal each must get.
fn hostile(elf: &[u8]) -> Vec<(&'static str, Vec<u8>, ProgramError)> {
    let mut out = vec![("truncated", elf[..100].to_vec(), ProgramError::Malformed)];
    let mut arm = elf.to_vec();
    put_u16(&mut arm, 18, 183); // EM_AARCH64
    out.push(("aarch64", arm, ProgramError::WrongMachine(183)));
    let mut kernel = elf.to_vec();
    let at = phdr(elf, 0, 16);
    put_u64(&mut kernel, at, nvram::layout::ROOT_HEADER);
    out.push(("inkernel", kernel, ProgramError::OutsideWindow(0)));
    let mut overlapping = elf.to_vec();
    let first = u64::from_le_bytes(elf[phdr(elf, 0, 16)..phdr(elf, 0, 24)].try_into().unwrap());
    let at = phdr(elf, 1, 16);
    put_u64(&mut overlapping, at, first);
    out.push(("overlap", overlapping, ProgramError::Overlap(1)));
    let mut huge = elf.to_vec();
    let at = phdr(elf, 1, 40);
    put_u64(&mut huge, at, 1 << 40);
    out.push(("huge", huge, ProgramError::OutsideWindow(1)));
    let mut large = elf.to_vec();
    put_u64(&mut large, at, 64 << 20);
    out.push(("large", large, ProgramError::TooLarge));
    let mut empty = elf.to_vec();
    put_u16(&mut empty, 56, 0); // e_phnum
    out.push(("nosegments", empty, ProgramError::NoSegments));
    out.push(("script", b"#!/bin/sh\necho hello\n".to_vec(), ProgramError::Malformed));
    out
}

#[test]
fn hostile_elf_files_are_refused_and_the_other_programs_run() {
    let scratch = Scratch::new();
    let cases = hostile(&counter_elf());
    let mut config = machine_config(&scratch, "apps=counter", 64 << 20);
    config.programs = cases
        .iter()
        .map(|(name, bytes, _)| {
            let path = scratch.path(&format!("{name}.elf"));
            std::fs::write(&path, bytes).unwrap();
            ProgramFile { path, args: String::new() }
        })
        .collect();
    let status = harness::run_then_crash(&config, Duration::from_secs(30), |s| {
        s.refused_total >= cases.len() as u64 && s.workloads.get("counter").is_some_and(|w| w.heartbeats >= 3)
    });
    let console = scratch.read_console();
    assert_eq!(status.refused.len(), cases.len(), "{:?}\n{console}", status.refused);
    for ((name, _, error), refused) in cases.iter().zip(&status.refused) {
        assert_eq!((refused.name.as_str(), refused.error), (*name, *error), "{console}");
        let line = format!("program {name} REFUSED: {error}");
        assert!(console.contains(&line), "no `{line}` in:\n{console}");
    }
    assert!(!console.contains("KERNEL PANIC") && !console.contains("fault"), "{console}");
    assert_eq!(status.rejected, 0, "the guest's reports were well formed");
}

#[test]
fn programs_for_an_image_that_will_resume_are_refused_before_the_boot() {
    let scratch = Scratch::new();
    let program = scratch.path("mine.elf");
    std::fs::write(&program, counter_elf()).unwrap();
    let image = scratch.image();
    let boot = |extra: &[&str], cmdline: &str| {
        let mut args: Vec<String> =
            ["boot", "--nvram", image.to_str().unwrap(), "--mem", "64M"].iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--cmdline".into(), cmdline.into(), "--console".into(), scratch.console().display().to_string()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        vmm(&refs).output().expect("run vmm")
    };
    let app = format!("{},x=1", program.display());
    // A fresh image starts it, and shuts down gracefully.
    let first = boot(&["--app", &app], "run_ms=300");
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(scratch.read_console().contains("process 0 (mine) started from its ELF file"));
    // The image will now resume: the same program again is refused, nothing booted.
    let second = boot(&["--app", &app], "run_ms=300");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(stderr.contains("will resume where it shut down"), "{stderr}");
    // Without it, the image resumes and the program goes on.
    let third = boot(&[], "run_ms=300");
    assert!(third.status.success(), "{}", String::from_utf8_lossy(&third.stderr));
    assert!(scratch.read_console().contains("resuming where it stopped"));
    // A file that cannot be read is said so.
    let missing = PathBuf::from("/nonexistent/prog.elf");
    let fourth = boot(&["--reformat", "--app", missing.to_str().unwrap()], "run_ms=300");
    let stderr = String::from_utf8_lossy(&fourth.stderr);
    assert!(!fourth.status.success() && stderr.contains("cannot read the program /nonexistent/prog.elf"), "{stderr}");
}

/// The bundled kernel's sources copied and rebuilt with another banner: an unrelated change,
/// which gives another build (other code addresses, another build hash) of the same NVM
/// ABI. Built once per target directory (incrementally after that).
fn kernel_with_another_banner() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel-variant");
    for tree in ["guest-kernel/src", "guest-kernel/.cargo", "nvram/src", "kernel-core/src"] {
        copy_tree(&root.join(tree), &work.join(tree));
    }
    for file in [
        "guest-kernel/Cargo.toml",
        "guest-kernel/Cargo.lock",
        "guest-kernel/build.rs",
        "guest-kernel/linker.ld",
        "nvram/Cargo.toml",
        "kernel-core/Cargo.toml",
    ] {
        std::fs::copy(root.join(file), work.join(file)).unwrap();
    }
    // Workspace inheritance: the copies need the root manifest's fields, with only the
    // members copied.
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = manifest.lines().find(|l| l.starts_with("members")).expect("the workspace lists its members");
    let manifest = manifest.replace(members, r#"members = ["nvram", "kernel-core"]"#);
    std::fs::write(work.join("Cargo.toml"), manifest).unwrap();
    let main = work.join("guest-kernel/src/main.rs");
    let text = std::fs::read_to_string(&main).unwrap();
    assert!(text.contains("\"Tender NVM kernel {}"), "the banner moved: update this test");
    std::fs::write(&main, text.replace("\"Tender NVM kernel {}", "\"Tender NVM kernel (variant) {}")).unwrap();
    let target = work.join("target");
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(work.join("guest-kernel"))
        .args(["build", "--release", "--locked", "--target", "x86_64-unknown-none", "--target-dir"])
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the variant kernel failed");
    target.join("x86_64-unknown-none/release/guest-kernel")
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

#[test]
fn an_image_outlives_a_kernel_build_with_an_unrelated_change() {
    let variant = kernel_with_another_banner();
    let bundled = vmm::kernel::BUNDLED_KERNEL;
    assert_ne!(std::fs::read(&variant).unwrap(), bundled, "the variant is another build");
    let scratch = Scratch::new();
    // Written by the bundled kernel, shut down gracefully...
    let config = machine_config(&scratch, "apps=counter,kv run_ms=600", 64 << 20);
    let (_, before) = harness::run_to_end(&config);
    let counted = before.workloads["counter"].progress;
    // ... resumed by the variant, whose programs go on from where they were.
    let mut resumed = machine_config(&scratch, "run_ms=600", 64 << 20);
    resumed.kernel = vmm::KernelSource::File(variant.clone());
    let (_, after) = harness::run_to_end(&resumed);
    let console = scratch.read_console();
    assert!(console.contains("Tender NVM kernel (variant)"), "{console}");
    assert!(console.contains("resuming where it stopped"), "{console}");
    assert!(after.workloads["counter"].progress > counted, "{after:?}");
    assert!(after.workloads.get("kv").is_some_and(|w| w.last_check != nvram::control::Verified::Failed));
    // And a crash under the variant restores under the bundled kernel.
    let mut crashing = machine_config(&scratch, "checkpoint_ms=50", 64 << 20);
    crashing.kernel = vmm::KernelSource::File(variant);
    harness::run_then_crash(&crashing, Duration::from_secs(20), |s| s.committed_generation >= 3);
    let restored = machine_config(&scratch, "run_ms=300", 64 << 20);
    let (_, last) = harness::run_to_end(&restored);
    assert_eq!(last.boot_kind, Some(nvram::control::BootKind::Restored), "{}", scratch.read_console());
    assert!(last.workloads.contains_key("counter"), "{last:?}");
}

/// The README's example program, built here as a user builds it (`cd examples && cargo
/// build --release`), into a target directory of the tests.
fn build_example() -> PathBuf {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("examples-target");
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&examples)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .expect("run cargo");
    assert!(status.success(), "building examples/ failed");
    target.join("x86_64-unknown-none/release/tally")
}

/// The last `tally: N saved` on the console, and the `restored at` count after it.
fn tally_counts(console: &str) -> (Option<u64>, Option<u64>) {
    let number = |line: &str, prefix: &str, suffix: &str| {
        line.strip_prefix(prefix).and_then(|r| r.strip_suffix(suffix)).and_then(|n| n.trim().parse().ok())
    };
    let saved = console.lines().rev().find_map(|l| number(l, "tally: ", " saved"));
    let restored = console.lines().rev().find_map(|l| number(l, "tally: restored at ", ""));
    (saved, restored)
}

#[test]
fn a_program_built_by_the_user_comes_back_after_a_sigkill() {
    let tally = build_example();
    let scratch = Scratch::new();
    let bad = scratch.path("broken.elf");
    std::fs::write(&bad, &counter_elf()[..200]).unwrap();
    let socket = scratch.path("vmm.sock");
    let (image, console, sock) =
        (scratch.image().display().to_string(), scratch.console().display().to_string(), socket.display().to_string());
    let app = format!("{},2000000", tally.display());
    let bad_app = bad.display().to_string();
    let args = [
        "boot",
        "--nvram",
        &image,
        "--mem",
        "64M",
        "--console",
        &console,
        "--control",
        &sock,
        "--app",
        &app,
        "--app",
        &bad_app,
    ];
    let quiet = || std::process::Stdio::null();
    let mut first = vmm(&args).stdout(quiet()).stderr(quiet()).spawn().expect("boot");
    common::wait_for_text(&scratch.console(), "tally: 6000000 saved", Duration::from_secs(30));
    // The control socket names the refused program and why.
    let status = vmm(&["ctl", "--socket", &sock, "status"]).output().expect("vmm ctl status");
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(said.contains("program broken REFUSED: not an ELF file"), "{said}");
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    let (saved, _) = tally_counts(&scratch.read_console());
    let saved = saved.expect("a checkpoint was saved");

    // No --app now: the program is in the image.
    let args = ["boot", "--nvram", &image, "--console", &console, "--cmdline", "run_ms=1500"];
    let second = common::run(&mut vmm(&args), Duration::from_secs(30));
    assert_eq!(second.code(), Some(0), "{second:?}");
    let console = scratch.read_console();
    let after = console.split("previous run stopped abruptly").nth(1).expect("the second boot restored");
    let (_, restored) = tally_counts(after);
    // Back in its checkpoint call with its count: the last one saved (or a later one, if a
    // write-out committed between the console line and the kill).
    let restored = restored.unwrap_or_else(|| panic!("no `restored at` after the restore:\n{console}"));
    assert!(restored >= saved && restored % 2_000_000 == 0, "saved {saved}, restored at {restored}:\n{console}");
    let (next, _) = tally_counts(after);
    assert!(next.is_some_and(|n| n > restored), "it goes on counting:\n{console}");
}
