//! Links the kernel with its own linker script, and gives it a build id: a hash of every
//! source that shapes what the kernel keeps in NVM, so that an image written by another
//! build is recognised and not continued.

use std::path::{Path, PathBuf};

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    println!("cargo:rustc-link-arg-bins=-T{}", dir.join("linker.ld").display());
    println!("cargo:rerun-if-changed=linker.ld");

    let root = dir.parent().expect("guest-kernel/ sits in the workspace");
    let mut files = Vec::new();
    for tree in ["guest-kernel/src", "kernel-core/src", "nvram/src"] {
        collect(&root.join(tree), &mut files);
        println!("cargo:rerun-if-changed={}", root.join(tree).display());
    }
    for file in ["guest-kernel/linker.ld", "guest-kernel/Cargo.lock"] {
        files.push(root.join(file));
    }
    files.sort();
    // FNV-1a over relative paths and contents: stable across machines and checkouts.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for file in &files {
        let relative = file.strip_prefix(root).unwrap_or(file);
        feed(relative.to_string_lossy().as_bytes());
        feed(&std::fs::read(file).unwrap_or_default());
    }
    println!("cargo:rustc-env=KERNEL_BUILD_ID={hash:016x}");
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}
