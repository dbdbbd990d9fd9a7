//! The guest kernel's pure logic: no hardware, no allocation, no statics, so that it runs in
//! the guest (kernel and user mode alike) and is tested on the host.
#![no_std]

pub mod churn;
pub mod dirty;
pub mod frames;
pub mod kv;
pub mod lazy;
pub mod plates;
pub mod process;
pub mod rng;
