//! What lasts in NVM: the root header and the tables it leads to ([`root`]), and Tender's
//! memory-resource tables reached through their replaceable operation tables
//! ([`resources`]). Uses `arch` and `dev`; knows nothing of the plate function or of
//! processes (the plate function replaces operations here at run time).

pub mod resources;
pub mod root;
