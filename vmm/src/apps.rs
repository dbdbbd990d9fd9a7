//! The bundled programs (placeholder until they are built and embedded).

/// A bundled program.
pub struct EmbeddedApp {
    pub name: &'static str,
    pub elf: &'static [u8],
}

/// Every bundled program.
pub const EMBEDDED: &[EmbeddedApp] = &[];

/// The bundled program called `name`.
pub fn embedded(name: &str) -> Option<&'static EmbeddedApp> {
    EMBEDDED.iter().find(|app| app.name == name)
}
