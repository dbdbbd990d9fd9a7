//! Everything the VMM and the guest kernel must agree on.
//!
//! This crate is `no_std` so that the guest kernel can use the very same definitions as
//! the host: the physical layout of the NVM image ([`layout`]), the I/O ports and the
//! values written to them ([`ports`], [`exit`]), the devices' records ([`control`],
//! [`engine`], [`persist`]), the PVH boot information ([`pvh`]) and the on-NVM structures
//! ([`header`], [`table`], [`resources`], [`plate`]). Each record is defined once, as a
//! `repr(C)` struct deriving `zerocopy`'s traits, so that both sides read and write it as
//! the struct itself: no offsets written out by hand anywhere. Host-only helpers (the
//! offline image decoder, [`inspect`]) sit behind the `std` feature.
//!
//! Any change to a `#[repr(C)]` structure kept in the image, or to the meaning of a field,
//! is a change of the image format and must bump [`header::FORMAT_VERSION`]; a device's
//! records (which live only while a machine runs) carry their own interface version
//! instead (`control::ABI_VERSION`, `engine::ABI_VERSION`, `persist::ABI_VERSION`), which the
//! guest checks when it probes the device. The compile-time size checks beside each record
//! catch an accidental change.
#![cfg_attr(not(feature = "std"), no_std)]

pub mod abi;
pub mod cmdline;
pub mod control;
pub mod disk;
#[cfg(feature = "std")]
pub mod disk_inspect;
pub mod engine;
pub mod exit;
pub mod fsck;
pub mod header;
#[cfg(feature = "std")]
pub mod inspect;
pub mod layout;
pub mod mmio;
pub mod persist;
pub mod plate;
pub mod plate_check;
pub mod ports;
pub mod program;
pub mod pvh;
pub mod resources;
pub mod table;
