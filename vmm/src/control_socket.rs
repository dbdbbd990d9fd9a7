//! The control socket: a Unix socket (mode 0600) on which clients send one JSON request per
//! line and get one JSON response per line ([`crate::api`]). Several clients at once, a
//! thread each; a bad line gets an error reply, an over-long one closes that connection;
//! nothing a client sends can harm the others or the guest.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use tracing::{debug, warn};

use crate::api::{self, AfterReply, ApiError, Controller, Response};

/// Longest request line, newline included.
pub const MAX_LINE: usize = 4096;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another VMM is listening on {}; give another control socket path or stop that VMM", path.display())]
    InUse { path: PathBuf },
    #[error("{} exists and is not a socket; remove it or give another control socket path", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot listen on {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What to do when a client asks for a crash: stop the machine dead and end the process.
pub type CrashHook = Arc<dyn Fn() + Send + Sync>;

/// A listening control socket; the socket file goes when this is dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    /// Listens on `path` (replacing a stale socket left by a dead VMM) and serves requests
    /// with `controller` on background threads.
    pub fn serve(path: &Path, controller: Controller, on_crash: CrashHook) -> Result<Self, SocketError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(SocketError::NotASocket { path: path.into() });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse { path: path.into() });
            }
            // Nobody answers: a socket file left by a VMM that died.
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind { path: path.into(), source })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| SocketError::Bind { path: path.into(), source })?;
        thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(stream) => {
                            let (controller, on_crash) = (controller.clone(), on_crash.clone());
                            let _ = thread::Builder::new()
                                .name("control-client".into())
                                .spawn(move || serve_client(stream, &controller, &on_crash));
                        }
                        Err(e) => warn!("control socket: accept failed: {e}"),
                    }
                }
            })
            .map_err(|source| SocketError::Bind { path: path.into(), source })?;
        Ok(Self { path: path.into() })
    }
}

fn serve_client(stream: UnixStream, controller: &Controller, on_crash: &CrashHook) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.by_ref().take(MAX_LINE as u64).read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) if line.last() != Some(&b'\n') => {
                if line.len() >= MAX_LINE {
                    let reply = Response::from(ApiError::TooLong(MAX_LINE));
                    let _ = writeln!(writer, "{}", reply.to_line());
                }
                // Over-long, or the client left mid-line: this connection ends.
                return;
            }
            Ok(_) => {}
            Err(e) => {
                debug!("control client: {e}");
                return;
            }
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let (reply, after) = match api::parse(text) {
            Ok(request) => controller.handle(&request),
            Err(e) => (e.into(), AfterReply::Nothing),
        };
        if writeln!(writer, "{}", reply.to_line()).and_then(|_| writer.flush()).is_err() {
            return;
        }
        if after == AfterReply::Crash {
            on_crash();
        }
    }
}
