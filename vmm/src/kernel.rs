//! The bundled guest kernel, built by `build.rs` from `guest-kernel/`.

/// The guest kernel ELF (PVH) embedded in this binary.
pub const BUNDLED_KERNEL: &[u8] = include_bytes!(env!("GUEST_KERNEL_PATH"));
