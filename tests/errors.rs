//! Every user error of `vmm boot` gets a message that names the problem and the fix, a
//! non-zero exit status, and no panic.

mod common;

use common::*;

/// Runs `vmm` with `args` and checks it failed cleanly with a message containing `expected`.
fn fails_with(args: &[&str], expected: &str) -> Finished {
    let out = run(&mut vmm(args), BOOT_LIMIT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("error: "), "{out:?}");
    assert!(out.stderr.contains(expected), "expected \"{expected}\" in:\n{out:?}");
    assert!(!out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"), "{out:?}");
    out
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[test]
fn missing_kvm_device() {
    let scratch = Scratch::new();
    let image = path(&scratch.image());
    fails_with(&["boot", "--nvram", &image, "--kvm-device", "/nonexistent/kvm"], "this host has no KVM");
    assert!(!scratch.image().exists(), "nothing is created when KVM is missing");
}

#[test]
fn image_is_a_directory() {
    let scratch = Scratch::new();
    let dir = scratch.path("");
    fails_with(&["boot", "--nvram", &path(&dir)], "is a directory");
}

/// Whether the tests run as root (as in CI), where file permissions do not stop anything.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Makes `file` unwritable, even for root (immutable attribute), until dropped.
struct Unwritable(std::path::PathBuf);

impl Unwritable {
    fn new(file: std::path::PathBuf) -> Self {
        let ok = if is_root() {
            std::process::Command::new("chattr").arg("+i").arg(&file).status().is_ok_and(|s| s.success())
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).is_ok()
        };
        assert!(ok, "cannot make {} unwritable (chattr +i as root, chmod otherwise)", file.display());
        Self(file)
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        if is_root() {
            let _ = std::process::Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
}

#[test]
fn image_that_cannot_be_written() {
    let scratch = Scratch::new();
    let image = scratch.image();
    std::fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
    let _guard = Unwritable::new(image.clone());
    let out = fails_with(&["boot", "--nvram", &path(&image)], "for reading and writing");
    assert!(out.stderr.contains("the VMM needs both"), "{out:?}");
}

#[test]
fn image_that_cannot_be_mapped() {
    // A file whose contents cannot be memory-mapped (procfs): refused, not a crash.
    fails_with(&["boot", "--nvram", "/proc/version"], "cannot map /proc/version as guest RAM");
}

#[test]
fn kvm_device_not_accessible() {
    let scratch = Scratch::new();
    let device = scratch.path("kvm");
    std::fs::write(&device, b"").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&device, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(scratch.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    let image = path(&scratch.path("nvm.img"));
    let args = ["boot", "--nvram", &image, "--kvm-device", &path(&device)];
    let out = if is_root() {
        // Root ignores file modes: run as nobody, as a user outside the kvm group would.
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", vmm_bin()]).args(args).env("RUST_LOG", "warn");
        run(&mut cmd, BOOT_LIMIT)
    } else {
        run(&mut vmm(&args), BOOT_LIMIT)
    };
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("no permission to open") && out.stderr.contains("kvm group"), "{out:?}");
}

#[test]
fn kvm_device_that_is_not_kvm() {
    let scratch = Scratch::new();
    let image = path(&scratch.image());
    fails_with(&["boot", "--nvram", &image, "--kvm-device", "/dev/null"], "/dev/null is not a usable KVM device");
}

#[test]
fn image_in_a_missing_directory() {
    fails_with(&["boot", "--nvram", "/nonexistent/dir/nvm.img"], "cannot create /nonexistent/dir/nvm.img");
}

#[test]
fn mem_disagrees_with_the_image() {
    let scratch = Scratch::new();
    let image = path(&scratch.image());
    std::fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
    let out = fails_with(
        &["boot", "--nvram", &image, "--mem", "64M"],
        "holds 33554432 bytes of RAM but --mem asks for 67108864",
    );
    assert!(out.stderr.contains("drop --mem"), "{out:?}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 32 << 20, "the image is left as it was");
}

#[test]
fn sizes_that_cannot_be_ram() {
    let scratch = Scratch::new();
    let image = path(&scratch.image());
    fails_with(&["boot", "--nvram", &image, "--mem", "16781313"], "is not a multiple of 4 KiB");
    fails_with(&["boot", "--nvram", &image, "--mem", "1M"], "is too small: the kernel needs at least");
    fails_with(&["boot", "--nvram", &image, "--mem", "8G"], "is too large");
    std::fs::File::create(&image).unwrap().set_len((32 << 20) + 100).unwrap();
    fails_with(&["boot", "--nvram", &image], "the image of 33554532 bytes is not a multiple of 4 KiB");
}

#[test]
fn bad_size_syntax_is_a_usage_error() {
    let out = run(&mut vmm(&["boot", "--nvram", "x.img", "--mem", "lots"]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("is not a size"), "{out:?}");
}

#[test]
fn kernel_file_missing() {
    let scratch = Scratch::new();
    let image = path(&scratch.image());
    fails_with(
        &["boot", "--nvram", &image, "--kernel", "/nonexistent/kernel.elf"],
        "cannot read the kernel /nonexistent/kernel.elf",
    );
}

#[test]
fn kernel_that_is_not_an_elf() {
    let scratch = Scratch::new();
    let kernel = scratch.path("junk.elf");
    std::fs::write(&kernel, b"this is not an ELF file").unwrap();
    let image = path(&scratch.image());
    fails_with(&["boot", "--nvram", &image, "--kernel", &path(&kernel)], "is not a loadable x86-64 ELF kernel");
}

#[test]
fn kernel_without_a_pvh_note() {
    let scratch = Scratch::new();
    // The bundled kernel with its note's type changed from 18 (PHYS32_ENTRY) to 17.
    let mut elf = vmm::kernel::BUNDLED_KERNEL.to_vec();
    let name = elf.windows(4).position(|w| w == b"Xen\0").expect("the kernel has a Xen note");
    assert_eq!(u32::from_le_bytes(elf[name - 4..name].try_into().unwrap()), 18);
    elf[name - 4] = 17;
    let kernel = scratch.path("no-pvh.elf");
    std::fs::write(&kernel, elf).unwrap();
    let image = path(&scratch.image());
    fails_with(&["boot", "--nvram", &image, "--kernel", &path(&kernel)], "without a PVH entry note");
}

#[test]
fn a_pvh_kernel_from_a_file_boots() {
    let scratch = Scratch::new();
    let kernel = scratch.path("kernel.elf");
    std::fs::write(&kernel, vmm::kernel::BUNDLED_KERNEL).unwrap();
    let mut args = boot_args(&scratch, "poweroff");
    args.extend(["--kernel".into(), path(&kernel)]);
    let out = run(vmm(&[]).args(args), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
}

/// A 32 MiB image file at `image` holding `header` (sealed) and nothing else.
fn write_image_with_header(image: &str, mut header: nvram::header::RootHeader) {
    header.seal();
    let mut bytes = vec![0u8; 32 << 20];
    let at = nvram::layout::ROOT_HEADER as usize;
    bytes[at..at + nvram::header::HEADER_SIZE].copy_from_slice(&header.to_bytes());
    std::fs::write(image, bytes).unwrap();
}

#[test]
fn a_foreign_image_is_refused_by_the_guest_and_reformat_recovers_it() {
    let scratch = Scratch::new();
    let image = path(&scratch.image());
    // An image whose root header carries another format version.
    let mut header = nvram::header::RootHeader::new(0);
    header.format_version += 1;
    write_image_with_header(&image, header);

    let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(5), "{out:?}");
    assert!(out.stderr.contains("--reformat"), "{out:?}");
    assert!(scratch.read_console().contains("refusing this image"), "{}", scratch.read_console());

    let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff")).arg("--reformat"), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
}

#[test]
fn an_image_of_another_nvm_abi_is_refused_with_its_version() {
    let scratch = Scratch::new();
    let image = path(&scratch.image());
    let mut header = nvram::header::RootHeader::new(0);
    header.nvm_abi = nvram::abi::NVM_ABI_VERSION + 1;
    header.shutdown_flag = nvram::header::ShutdownFlag::Normal.into();
    header.frames = 1024;
    header.resources = nvram::layout::RESOURCES;
    write_image_with_header(&image, header);
    let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(5), "{out:?}");
    let console = scratch.read_console();
    let said = format!("NVM ABI version {}, this kernel keeps version {}", header.nvm_abi, nvram::abi::NVM_ABI_VERSION);
    assert!(console.contains(&said), "{console}");
}

#[test]
fn inspect_explains_every_kind_of_image() {
    let scratch = Scratch::new();
    let image = path(&scratch.image());
    // Garbage, truncated, blank.
    std::fs::write(&image, b"garbage").unwrap();
    let out = run(&mut vmm(&["inspect", &image]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stdout.contains("truncated"), "{out:?}");
    std::fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
    let out = run(&mut vmm(&["inspect", &image]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("blank"), "{out:?}");
    let mut junk = vec![0x5au8; 12 << 20];
    junk[..4].copy_from_slice(b"junk");
    std::fs::write(&image, &junk).unwrap();
    let out = run(&mut vmm(&["inspect", &image]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stdout.contains("foreign") && out.stdout.contains("--reformat"), "{out:?}");
    assert!(!out.stderr.contains("panicked"), "{out:?}");
    let out = run(&mut vmm(&["inspect", "/nonexistent.img"]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("cannot open"), "{out:?}");
}

#[test]
fn inspect_shows_the_committed_plate_table() {
    let scratch = Scratch::new();
    let out = run(vmm(&[]).args(boot_args(&scratch, "apps=counter run_ms=300")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let image = path(&scratch.image());
    let out = run(&mut vmm(&["inspect", "--json", &image]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["verdict"], "formatted");
    assert_eq!(report["header"]["shutdown_flag"], "normal");
    assert_eq!(report["resources_ok"], true);
    let committed = report["committed"].as_u64().expect("a committed slot") as usize;
    assert_eq!(report["slots"][committed]["valid"], true);
    let kinds: Vec<&str> = report["plates"].as_array().unwrap().iter().map(|p| p["kind"].as_str().unwrap()).collect();
    for kind in ["fixed table", "kernel space", "page tables", "user space"] {
        assert!(kinds.contains(&kind), "{kinds:?}");
    }
    let human = run(&mut vmm(&["inspect", &image]), BOOT_LIMIT);
    assert!(human.stdout.contains("(committed)"), "{human:?}");
}

#[test]
fn an_unknown_cmdline_key_is_a_usage_error_that_lists_the_known_ones() {
    let scratch = Scratch::new();
    let out = run(vmm(&[]).args(boot_args(&scratch, "apps=kv chekpoint_ms=50")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("--cmdline") && out.stderr.contains("`chekpoint_ms=50`"), "{out:?}");
    for key in ["checkpoint_ms", "kv_verify_every", "counter_shutdown", "plate_copy"] {
        assert!(out.stderr.contains(key), "{key} is listed: {out:?}");
    }
    assert!(!scratch.image().exists(), "nothing is created for a bad command line");
}

#[test]
fn a_known_cmdline_key_with_a_bad_value_is_a_usage_error() {
    let scratch = Scratch::new();
    let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff plate_copy=gpu")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("`plate_copy=gpu` has a bad value"), "{out:?}");
    assert!(!scratch.image().exists());
}

#[test]
fn crash_evict_under_eadr_is_a_usage_error_for_boot_too() {
    // It used to be dropped silently by `vmm boot`: under eADR nothing is evicted.
    let scratch = Scratch::new();
    let mut args = boot_args(&scratch, "poweroff");
    args.extend(["--crash-evict".into(), "0.5".into()]);
    let out = run(vmm(&[]).args(args), BOOT_LIMIT);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("--persistence adr"), "{out:?}");
    assert!(!scratch.image().exists());
}
