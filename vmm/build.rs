//! Builds the bundled guest kernel for `x86_64-unknown-none` and hands its path to the crate
//! (`include_bytes!` in `src/kernel.rs`), so that a plain `cargo build` gives a VMM that boots.
//!
//! The guest is its own workspace (`guest-kernel/`, own lock file and `.cargo/config.toml`);
//! it is built by a nested cargo into `OUT_DIR`, always in release mode: under PVM the
//! guest's kernel mode is emulated instruction by instruction, and debug code would be
//! several times slower. rustup does not add the target listed in `rust-toolchain.toml` to
//! a toolchain that is already installed, so this script adds it when it is missing.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("vmm/ sits in the workspace").to_path_buf();
    let guest = root.join("guest-kernel");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    for path in [
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
    ] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=VMM_GUEST_KERNEL");

    // A prebuilt kernel can be supplied instead (for packaging, or to test another kernel).
    if let Some(prebuilt) = env::var_os("VMM_GUEST_KERNEL") {
        println!("cargo:rustc-env=GUEST_KERNEL_PATH={}", PathBuf::from(prebuilt).display());
        return;
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    ensure_target(Path::new(&rustc));

    let target_dir = out_dir.join("guest-target");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest)
        .args(["build", "--release", "--locked", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    // The outer build's flags and wrappers (clippy, coverage, host RUSTFLAGS) are for the
    // host crates, not for the guest; its own flags come from guest-kernel/.cargo/config.toml.
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
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cargo:?} to build the guest kernel: {e}"));
    if !status.success() {
        panic!("building the guest kernel failed ({status}); run `cargo build --release` in guest-kernel/ to see why");
    }
    let kernel = target_dir.join(TARGET).join("release").join("guest-kernel");
    println!("cargo:rustc-env=GUEST_KERNEL_PATH={}", kernel.display());
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
