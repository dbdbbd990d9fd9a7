//! Tender's memory resources and their management tables, as kept in NVM. The layout is
//! the image format's (so `vmm inspect` checks the tables without the kernel's logic);
//! the guest kernel uses it as is.
//!
//! Every resource is named by (type, id): the type is one of [`Kind`], the id its index in
//! the type's [`Table`]. The tables live together in one [`Resources`] block at a fixed
//! physical address (`crate::layout::RESOURCES`), so that boot finds them without help.
//!
//! | resource             | what it is                                                      |
//! |----------------------|-----------------------------------------------------------------|
//! | real memory          | a run of physical frames of NVM                                 |
//! | virtual region       | a memory image, whose contents live in one real memory          |
//! | virtual space        | an address space: a page-table root                             |
//! | virtual kernel space | a virtual region attached into the kernel's space               |
//! | virtual user space   | a virtual region attached into a process's virtual space        |
//! | process              | a thread of execution in a virtual space (see `process`)        |

use num_enum::{IntoPrimitive, TryFromPrimitive};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::table::Table;

/// The resource types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromPrimitive, IntoPrimitive)]
#[repr(u32)]
pub enum Kind {
    RealMemory = 1,
    VirtualRegion = 2,
    VirtualSpace = 3,
    VirtualKernelSpace = 4,
    VirtualUserSpace = 5,
    Process = 6,
}

/// A resource's name: its type and its index in the type's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResName {
    pub kind: Kind,
    pub id: u32,
}

/// A run of physical frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RealMemory {
    /// Physical address of the first frame.
    pub base: u64,
    pub pages: u64,
}

/// A memory image whose contents are the frames of one real memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct VirtualRegion {
    /// The real memory holding the contents.
    pub real: u32,
    pub flags: u32,
    pub pages: u64,
}

/// An address space. Its page tables come from a pool of frames of its own (a real
/// memory), so that they are found, saved and restored as one run of frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct VirtualSpace {
    /// Physical address of the PML4: the pool's first frame.
    pub root: u64,
    /// Next free user virtual address (user spaces are attached at increasing addresses).
    pub next_va: u64,
    /// Process that owns the space.
    pub owner: u32,
    /// The real memory holding the page-table pool.
    pub pool: u32,
    /// Frames of the pool in use (the PML4 included).
    pub pool_used: u32,
    pub reserved: u32,
}

/// Frames in a space's page-table pool: the PML4, a PDPT, a PD and page tables for 58 MiB
/// of user space.
pub const TABLE_POOL_PAGES: u64 = 32;

/// A region attached into the kernel's space (identity-mapped: `vaddr` is its frames' address).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct VirtualKernelSpace {
    pub region: u32,
    /// What the kernel keeps there (see [`KernelSpaceUse`]).
    pub usage: u32,
    pub vaddr: u64,
}

/// What a virtual kernel space holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromPrimitive, IntoPrimitive)]
#[repr(u32)]
pub enum KernelSpaceUse {
    /// The process table.
    ProcessTable = 1,
}

/// A region attached into a process's space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct VirtualUserSpace {
    pub region: u32,
    /// The virtual space it is attached into.
    pub space: u32,
    pub vaddr: u64,
    pub pages: u64,
    /// [`USER_WRITABLE`] and friends.
    pub flags: u64,
}

/// A user space the process may write.
pub const USER_WRITABLE: u64 = 1;
/// A user space the process may run (a program's code; never together with [`USER_WRITABLE`]).
pub const USER_EXECUTABLE: u64 = 2;

/// Capacities of the tables.
pub const REAL_MEMORIES: usize = 1024;
pub const REGIONS: usize = 1024;
pub const SPACES: usize = 64;
pub const KERNEL_SPACES: usize = 64;
pub const USER_SPACES: usize = 1024;

// The entries' sizes are part of the image format (each table checks its own at boot).
const _: () = assert!(core::mem::size_of::<RealMemory>() == 16 && core::mem::size_of::<VirtualRegion>() == 16);
const _: () = assert!(core::mem::size_of::<VirtualSpace>() == 32 && core::mem::size_of::<VirtualKernelSpace>() == 16);
const _: () = assert!(core::mem::size_of::<VirtualUserSpace>() == 32);

/// All the memory resources' tables, as one block in NVM.
#[derive(FromBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Resources {
    pub real: Table<RealMemory, REAL_MEMORIES>,
    pub regions: Table<VirtualRegion, REGIONS>,
    pub spaces: Table<VirtualSpace, SPACES>,
    pub kernel_spaces: Table<VirtualKernelSpace, KERNEL_SPACES>,
    pub user_spaces: Table<VirtualUserSpace, USER_SPACES>,
}

/// A table in the block does not hold what it should.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorruptTable(pub Kind);

impl Resources {
    /// Formats every table, empty.
    pub fn format(&mut self) {
        self.real.format(Kind::RealMemory as u32);
        self.regions.format(Kind::VirtualRegion as u32);
        self.spaces.format(Kind::VirtualSpace as u32);
        self.kernel_spaces.format(Kind::VirtualKernelSpace as u32);
        self.user_spaces.format(Kind::VirtualUserSpace as u32);
    }

    /// Checks every table's header.
    pub fn check(&self) -> Result<(), CorruptTable> {
        let err = |kind| move |_| CorruptTable(kind);
        self.real.check(Kind::RealMemory as u32).map_err(err(Kind::RealMemory))?;
        self.regions.check(Kind::VirtualRegion as u32).map_err(err(Kind::VirtualRegion))?;
        self.spaces.check(Kind::VirtualSpace as u32).map_err(err(Kind::VirtualSpace))?;
        self.kernel_spaces.check(Kind::VirtualKernelSpace as u32).map_err(err(Kind::VirtualKernelSpace))?;
        self.user_spaces.check(Kind::VirtualUserSpace as u32).map_err(err(Kind::VirtualUserSpace))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn the_block_fits_its_reserved_area_and_formats() {
        let size = core::mem::size_of::<Resources>() as u64;
        assert!(size <= crate::layout::RESOURCES_MAX, "{size} bytes");
        assert!(size <= crate::layout::RESOURCES_SAVE_MAX, "{size} bytes");
        let mut block = <Resources as zerocopy::FromZeros>::new_box_zeroed().expect("the block fits in memory");
        assert_eq!(block.check(), Err(CorruptTable(Kind::RealMemory)));
        block.format();
        assert_eq!(block.check(), Ok(()));
        let real = block.real.insert(RealMemory { base: 0x100_0000, pages: 4 }).unwrap();
        let region = block.regions.insert(VirtualRegion { real, flags: 0, pages: 4 }).unwrap();
        assert_eq!(block.regions.get(region).unwrap().real, real);
    }
}
