//! Operations on Tender's memory resources, reached through one operation table per
//! resource type, so that a single operation can be replaced at run time (the plate
//! function replaces "delete virtual user space" so that deletion defers the freeing of
//! save areas).
//!
//! Creating a user space, for example, allocates real memory (frames), makes a virtual
//! region of it, and attaches the region into the process's virtual space at the next free
//! user address.

use kernel_core::frames::FrameBitmap;
use nvram::abi::{PROGRAM_BASE, PROGRAM_END};
use nvram::plate::PlateTable;
use nvram::resources::{
    KernelSpaceUse, RealMemory, Resources, VirtualKernelSpace, VirtualRegion, VirtualSpace, VirtualUserSpace,
    TABLE_POOL_PAGES, USER_EXECUTABLE, USER_WRITABLE,
};
use spin::RwLock;

use crate::arch::paging::{self, Access, TablePool};

const PAGE: u64 = 4096;

/// What the operations work on: the tables they touch, and nothing of the kernel above
/// them (processes, scheduler), so that this layer stays below its users. Built for each
/// call from the kernel's state (`proc::kernel::Kernel::mem`).
pub struct Mem<'a> {
    /// Tender's memory-resource tables (NVM).
    pub res: &'a mut Resources,
    /// The frame allocator (NVM).
    pub frames: &'a mut FrameBitmap<'static>,
    /// The live plate table when the plate function is on: its replacement delete
    /// operations record there the save areas whose freeing they defer. The default
    /// operations leave it alone.
    pub plates: Option<&'a mut PlateTable>,
    /// The allocator of save areas when it is not `frames` (`plate_store=disk`: the disk's
    /// area space), where a deletion's save areas are freed.
    pub areas: Option<&'a mut FrameBitmap<'static>>,
}

/// Why a resource operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResError {
    /// No frames, or a table is full.
    Exhausted,
    /// No such resource.
    NoSuch,
    /// The user address space is used up.
    NoAddressSpace,
}

/// Real memory: runs of frames.
pub struct RealMemoryOps {
    pub create: fn(&mut Mem<'_>, pages: u64) -> Result<u32, ResError>,
    pub delete: fn(&mut Mem<'_>, id: u32) -> Result<(), ResError>,
}

/// Virtual regions: memory images on real memory.
pub struct RegionOps {
    pub create: fn(&mut Mem<'_>, pages: u64) -> Result<u32, ResError>,
    pub delete: fn(&mut Mem<'_>, id: u32) -> Result<(), ResError>,
}

/// Virtual spaces: page-table roots.
pub struct SpaceOps {
    pub create: fn(&mut Mem<'_>, owner: u32) -> Result<u32, ResError>,
    pub delete: fn(&mut Mem<'_>, id: u32) -> Result<(), ResError>,
}

/// Virtual kernel spaces: regions attached into the kernel's space.
pub struct KernelSpaceOps {
    pub create: fn(&mut Mem<'_>, pages: u64, usage: KernelSpaceUse) -> Result<u32, ResError>,
    pub delete: fn(&mut Mem<'_>, id: u32) -> Result<(), ResError>,
}

/// Where a new user space goes in its process's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// At the next free address of the `map` window (`nvram::abi::USER_BASE` up to
    /// `PROGRAM_BASE`), followed by an unmapped guard page.
    Next,
    /// At this page-aligned address of the program window (a program's segment, where its
    /// ELF file was linked).
    At(u64),
}

/// Virtual user spaces: regions attached into a process's space.
pub struct UserSpaceOps {
    pub create: fn(&mut Mem<'_>, space: u32, pages: u64, flags: u64, place: Place) -> Result<u32, ResError>,
    pub delete: fn(&mut Mem<'_>, id: u32) -> Result<(), ResError>,
}

/// The operation tables of every memory resource type.
pub struct Ops {
    pub real: RealMemoryOps,
    pub region: RegionOps,
    pub space: SpaceOps,
    pub kernel_space: KernelSpaceOps,
    pub user_space: UserSpaceOps,
}

/// The operations in force. Read at each call, so that a replacement takes effect at once.
pub static OPS: RwLock<Ops> = RwLock::new(Ops {
    real: RealMemoryOps { create: real_create, delete: real_delete },
    region: RegionOps { create: region_create, delete: region_delete },
    space: SpaceOps { create: space_create, delete: space_delete_now },
    kernel_space: KernelSpaceOps { create: kernel_space_create, delete: kernel_space_delete_now },
    user_space: UserSpaceOps { create: user_space_create, delete: user_space_delete_now },
});

/// Calls the operation `op` of the table in force.
#[macro_export]
macro_rules! res_op {
    ($ty:ident . $op:ident ( $($arg:expr),* )) => {{
        let f = $crate::nvm::resources::OPS.read().$ty.$op;
        // A `let`, so that the arguments' temporaries (a `Kernel::mem` view) end here.
        let result = f($($arg),*);
        result
    }};
}

/// Allocates frames; their contents are whatever the image held (zeroing is the user's
/// choice: under PVM each zeroed page costs hundreds of emulated instructions).
fn real_create(m: &mut Mem<'_>, pages: u64) -> Result<u32, ResError> {
    let base = m.frames.alloc(pages).map_err(|_| ResError::Exhausted)?;
    match m.res.real.insert(RealMemory { base, pages }) {
        Some(id) => Ok(id),
        None => {
            let _ = m.frames.free(base, pages);
            Err(ResError::Exhausted)
        }
    }
}

fn real_delete(m: &mut Mem<'_>, id: u32) -> Result<(), ResError> {
    let real = m.res.real.remove(id).ok_or(ResError::NoSuch)?;
    m.frames.free(real.base, real.pages).map_err(|_| ResError::NoSuch)
}

fn region_create(m: &mut Mem<'_>, pages: u64) -> Result<u32, ResError> {
    let real = res_op!(real.create(m, pages))?;
    match m.res.regions.insert(VirtualRegion { real, flags: 0, pages }) {
        Some(id) => Ok(id),
        None => {
            res_op!(real.delete(m, real))?;
            Err(ResError::Exhausted)
        }
    }
}

fn region_delete(m: &mut Mem<'_>, id: u32) -> Result<(), ResError> {
    let region = m.res.regions.remove(id).ok_or(ResError::NoSuch)?;
    res_op!(real.delete(m, region.real))
}

/// Physical address of a region's contents.
pub fn region_base(res: &Resources, region: u32) -> Option<u64> {
    let region = res.regions.get(region)?;
    Some(res.real.get(region.real)?.base)
}

fn space_create(m: &mut Mem<'_>, owner: u32) -> Result<u32, ResError> {
    let pool = res_op!(real.create(m, TABLE_POOL_PAGES))?;
    let root = m.res.real.get(pool).ok_or(ResError::NoSuch)?.base;
    paging::init_root(root);
    let space = VirtualSpace { root, next_va: paging::USER_BASE, owner, pool, pool_used: 1, reserved: 0 };
    match m.res.spaces.insert(space) {
        Some(id) => Ok(id),
        None => {
            res_op!(real.delete(m, pool))?;
            Err(ResError::Exhausted)
        }
    }
}

/// Deletes a space and every user space attached into it (through the user-space delete
/// operation in force).
pub fn space_delete_now(m: &mut Mem<'_>, id: u32) -> Result<(), ResError> {
    let attached: heapless_ids::Ids = m.res.user_spaces.iter().filter(|(_, u)| u.space == id).map(|(i, _)| i).collect();
    for user in attached.iter() {
        res_op!(user_space.delete(m, user))?;
    }
    let space = m.res.spaces.remove(id).ok_or(ResError::NoSuch)?;
    if paging::current_root() == space.root {
        paging::switch_to(paging::kernel_root());
    }
    res_op!(real.delete(m, space.pool))
}

fn kernel_space_create(m: &mut Mem<'_>, pages: u64, usage: KernelSpaceUse) -> Result<u32, ResError> {
    let region = res_op!(region.create(m, pages))?;
    let vaddr = region_base(m.res, region).ok_or(ResError::NoSuch)?;
    crate::arch::memory::zero(vaddr, pages * PAGE);
    match m.res.kernel_spaces.insert(VirtualKernelSpace { region, usage: usage as u32, vaddr }) {
        Some(id) => Ok(id),
        None => {
            res_op!(region.delete(m, region))?;
            Err(ResError::Exhausted)
        }
    }
}

/// Deletes a kernel space and frees its frames at once.
pub fn kernel_space_delete_now(m: &mut Mem<'_>, id: u32) -> Result<(), ResError> {
    let space = m.res.kernel_spaces.remove(id).ok_or(ResError::NoSuch)?;
    res_op!(region.delete(m, space.region))
}

fn user_space_create(m: &mut Mem<'_>, space_id: u32, pages: u64, flags: u64, place: Place) -> Result<u32, ResError> {
    let space = *m.res.spaces.get(space_id).ok_or(ResError::NoSuch)?;
    let (va, next_va) = match place {
        // Each user space is followed by an unmapped guard page.
        Place::Next => {
            let end = space.next_va.checked_add((pages + 1) * PAGE).filter(|&end| end <= PROGRAM_BASE);
            (space.next_va, end.ok_or(ResError::NoAddressSpace)?)
        }
        Place::At(va) => {
            let end = va.checked_add(pages * PAGE).ok_or(ResError::NoAddressSpace)?;
            let taken = m
                .res
                .user_spaces
                .iter()
                .any(|(_, u)| u.space == space_id && va < u.vaddr + u.pages * PAGE && u.vaddr < end);
            if va % PAGE != 0 || va < PROGRAM_BASE || end > PROGRAM_END || taken {
                return Err(ResError::NoAddressSpace);
            }
            (va, space.next_va)
        }
    };
    let region = res_op!(region.create(m, pages))?;
    let phys = region_base(m.res, region).ok_or(ResError::NoSuch)?;
    crate::arch::memory::zero(phys, pages * PAGE);
    let pool_base = m.res.real.get(space.pool).ok_or(ResError::NoSuch)?.base;
    let mut used = space.pool_used;
    let mut pool = TablePool { base: pool_base, capacity: TABLE_POOL_PAGES, used: &mut used };
    let access = match (flags & USER_WRITABLE != 0, flags & USER_EXECUTABLE != 0) {
        (true, _) => Access::ReadWrite,
        (false, true) => Access::ReadExecute,
        (false, false) => Access::Read,
    };
    let mapped = paging::map_user(space.root, va, phys, pages, access, &mut pool);
    if let Some(space) = m.res.spaces.get_mut(space_id) {
        space.pool_used = used;
    }
    if mapped.is_err() {
        paging::unmap_user(space.root, va, pages);
        res_op!(region.delete(m, region))?;
        return Err(ResError::Exhausted);
    }
    if let Some(space) = m.res.spaces.get_mut(space_id) {
        space.next_va = next_va;
    }
    match m.res.user_spaces.insert(VirtualUserSpace { region, space: space_id, vaddr: va, pages, flags }) {
        Some(id) => Ok(id),
        None => {
            paging::unmap_user(space.root, va, pages);
            res_op!(region.delete(m, region))?;
            Err(ResError::Exhausted)
        }
    }
}

/// Deletes a user space and frees its frames at once.
pub fn user_space_delete_now(m: &mut Mem<'_>, id: u32) -> Result<(), ResError> {
    let user = m.res.user_spaces.remove(id).ok_or(ResError::NoSuch)?;
    if let Some(space) = m.res.spaces.get(user.space) {
        paging::unmap_user(space.root, user.vaddr, user.pages);
    }
    res_op!(region.delete(m, user.region))
}

/// The user space of `space` that contains `addr..addr + len`, if one does.
/// Physical address of user space `id`'s first page (its region is one run of frames).
pub fn user_space_phys(res: &Resources, id: u32) -> Option<u64> {
    region_base(res, res.user_spaces.get(id)?.region)
}

pub fn user_space_at(res: &Resources, space: u32, addr: u64, len: u64) -> Option<(u32, VirtualUserSpace)> {
    let end = addr.checked_add(len)?;
    res.user_spaces
        .iter()
        .find(|(_, u)| u.space == space && addr >= u.vaddr && end <= u.vaddr + u.pages * PAGE)
        .map(|(id, u)| (id, *u))
}

/// A small fixed-capacity list of ids, to collect before mutating a table.
mod heapless_ids {
    pub struct Ids {
        ids: [u32; nvram::resources::USER_SPACES],
        len: usize,
    }

    impl Ids {
        pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
            self.ids[..self.len].iter().copied()
        }
    }

    impl FromIterator<u32> for Ids {
        fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
            let mut out = Ids { ids: [0; nvram::resources::USER_SPACES], len: 0 };
            for id in iter.into_iter().take(out.ids.len()) {
                out.ids[out.len] = id;
                out.len += 1;
            }
            out
        }
    }
}
