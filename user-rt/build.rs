//! Puts the program linker script (`link.ld`) where the final link of every program that
//! uses this crate finds it: a `rustc-link-search` path is handed to the crates that depend
//! on this one, so a program's `.cargo/config.toml` only names it (`-C link-arg=-Tuser-rt.ld`)
//! wherever the program lives.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::copy("link.ld", out.join("user-rt.ld")).expect("copy link.ld to OUT_DIR");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=link.ld");
}
