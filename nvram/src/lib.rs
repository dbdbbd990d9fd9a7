//! Everything the VMM and the guest kernel must agree on.
//!
//! This crate is `no_std` so that the guest kernel can use the very same definitions as
//! the host: the physical layout of the NVM image ([`layout`]), the I/O ports and the
//! values written to them ([`ports`], [`exit`]), and the on-NVM structures ([`header`]).
//! Host-only helpers sit behind the `std` feature.
//!
//! Any change to a `#[repr(C)]` structure here or to the meaning of a field is a change
//! of the image format and must bump [`header::FORMAT_VERSION`].
#![cfg_attr(not(feature = "std"), no_std)]

pub mod cmdline;
pub mod control;
pub mod engine;
pub mod exit;
pub mod header;
pub mod layout;
pub mod persist;
pub mod ports;
