//! Tender's memory resources and their management tables: their NVM layout is
//! `nvram::resources`'s, re-exported under its old path.

// guest still uses this path; goes with the guest's switch (to `nvram::resources`)
pub use nvram::resources::*;
