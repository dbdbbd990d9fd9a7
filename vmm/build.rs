//! Builds the bundled guest kernel and the workloads' programs for `x86_64-unknown-none` and
//! hands their paths to the crate (`include_bytes!` in `src/kernel.rs` and `src/apps.rs`), so
//! that a plain `cargo build` gives a VMM that boots and runs them.
//!
//! The guest kernel (`guest-kernel/`) and the programs (`apps/`, built with `user-rt/`) are
//! workspaces of their own (own lock file and `.cargo/config.toml`, which hold their target
//! and link settings); each is built by a nested cargo into `OUT_DIR`, always in release
//! mode: under PVM the guest's kernel mode is emulated instruction by instruction, and debug
//! code would be several times slower. rustup does not add the target listed in
//! `rust-toolchain.toml` to a toolchain that is already installed, so this script adds it
//! when it is missing.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-none";

/// The workloads' programs: `apps/NAME` builds the binary `NAME` (`src/apps.rs` embeds each).
const APPS: &[&str] = &["counter", "kv", "memtouch", "deleter", "fault", "churn"];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("vmm/ sits in the workspace").to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    let mut watched: Vec<String> = [
        "guest-kernel/src",
        "guest-kernel/Cargo.toml",
        "guest-kernel/Cargo.lock",
        "guest-kernel/build.rs",
        "guest-kernel/linker.ld",
        "guest-kernel/.cargo/config.toml",
        "nvram/src",
        "nvram/Cargo.toml",
        "kernel-core/src",
        "kernel-core/Cargo.toml",
        "user-rt/src",
        "user-rt/Cargo.toml",
        "user-rt/build.rs",
        "user-rt/link.ld",
        "apps/Cargo.toml",
        "apps/Cargo.lock",
        "apps/.cargo/config.toml",
    ]
    .map(String::from)
    .into();
    // Not the whole of apps/: a build there (apps/target) would make every build rerun this.
    for app in APPS {
        watched.push(format!("apps/{app}/src"));
        watched.push(format!("apps/{app}/Cargo.toml"));
    }
    for path in &watched {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=VMM_GUEST_KERNEL");
    println!("cargo:rerun-if-env-changed=VMM_GUEST_APPS");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    ensure_target(Path::new(&rustc));

    // A prebuilt kernel can be supplied instead (for packaging, or to test another kernel).
    if let Some(prebuilt) = env::var_os("VMM_GUEST_KERNEL") {
        println!("cargo:rustc-env=GUEST_KERNEL_PATH={}", PathBuf::from(prebuilt).display());
    } else {
        let target_dir = out_dir.join("guest-target");
        nested_build(&cargo, &root.join("guest-kernel"), &target_dir, "the guest kernel");
        let kernel = target_dir.join(TARGET).join("release").join("guest-kernel");
        println!("cargo:rustc-env=GUEST_KERNEL_PATH={}", kernel.display());
    }

    // Likewise prebuilt programs: a directory holding one ELF file per name of APPS.
    if let Some(prebuilt) = env::var_os("VMM_GUEST_APPS") {
        println!("cargo:rustc-env=GUEST_APPS_DIR={}", PathBuf::from(prebuilt).display());
    } else {
        let target_dir = out_dir.join("apps-target");
        nested_build(&cargo, &root.join("apps"), &target_dir, "the workloads' programs");
        let apps = target_dir.join(TARGET).join("release");
        println!("cargo:rustc-env=GUEST_APPS_DIR={}", apps.display());
    }
}

/// Builds the guest workspace in `dir` (release, for the guest's target) into `target_dir`.
fn nested_build(cargo: &std::ffi::OsStr, dir: &Path, target_dir: &Path, what: &str) {
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dir).args(["build", "--release", "--locked", "--target", TARGET, "--target-dir"]).arg(target_dir);
    // The outer build's flags and wrappers (clippy, coverage, host RUSTFLAGS) are for the
    // host crates, not for the guest; its own flags come from its .cargo/config.toml.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cargo:?} to build {what}: {e}"));
    if !status.success() {
        panic!("building {what} failed ({status}); run `cargo build --release` in {} to see why", dir.display());
    }
}

/// Adds the guest's target to the toolchain that builds us when it is not installed yet.
fn ensure_target(rustc: &Path) {
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(sysroot) = &sysroot {
        if sysroot.join("lib/rustlib").join(TARGET).join("lib").is_dir() {
            return;
        }
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", TARGET]);
    if let Some(toolchain) = env::var_os("RUSTUP_TOOLCHAIN") {
        cmd.arg("--toolchain").arg(toolchain);
    }
    match cmd.status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("`rustup target add {TARGET}` failed ({status}); the guest kernel needs that target"),
        Err(e) => panic!("cannot run rustup to add the {TARGET} target ({e}); install the target by hand"),
    }
}
