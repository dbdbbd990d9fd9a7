//! The fixed-capacity resource table, laid out in NVM: `nvram::table`'s, re-exported under
//! its old path.

// guest still uses this path; goes with the guest's switch (to `nvram::table`)
pub use nvram::table::*;
