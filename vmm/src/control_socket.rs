//! The control socket: a Unix socket (mode 0600) on which clients send one JSON request per
//! line and get one JSON response per line ([`crate::api`]). Nothing a client sends, or
//! how many come, can harm the others or the guest:
//!
//! - a bad line gets an error reply, an over-long one closes that connection;
//! - at most [`MAX_CLIENTS`] clients at once (fewer under a low file-descriptor limit), a
//!   thread each: the one over gets a one-line refusal and is closed, so the threads and
//!   descriptors the socket takes are bounded;
//! - a client that sends no complete line for [`IDLE_TIMEOUT`] is closed;
//! - when `accept` fails for want of descriptors (`EMFILE`, `ENFILE`), the server says so
//!   once and waits [`ACCEPT_BACKOFF`] before trying again, rather than spinning a core and
//!   writing a warning per attempt.
//!
//! The socket is bound ([`ControlSocket::bind`]) before the machine is built, so that a
//! boot refused for its socket creates no image.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, error, warn};

use crate::api::{self, AfterReply, ApiError, Controller, Response};

/// Longest request line, newline included.
pub const MAX_LINE: usize = 4096;
/// Most clients served at once.
pub const MAX_CLIENTS: usize = 64;
/// How long a client may take to send a complete line.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The wait before accepting again after `accept` failed.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a refusal may take to write: a refused client must not stall the acceptor.
const REFUSAL_TIMEOUT: Duration = Duration::from_millis(100);

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

/// A bound control socket, serving once [`ControlSocket::start`]ed; the socket file goes
/// when this is dropped.
pub struct ControlSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    /// Binds `path` (replacing a stale socket left by a dead VMM; refusing a live one or a
    /// file that is not a socket). Clients that connect before [`ControlSocket::start`]
    /// wait in the backlog.
    pub fn bind(path: &Path) -> Result<Self, SocketError> {
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
        // From here the file is ours: dropping `socket` removes it if the next step fails.
        let socket = Self { path: path.into(), listener: Some(listener) };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| SocketError::Bind { path: path.into(), source })?;
        Ok(socket)
    }

    /// Serves requests with `controller` on background threads (once; later calls do
    /// nothing).
    pub fn start(&mut self, controller: Controller, on_crash: CrashHook) -> Result<(), SocketError> {
        let Some(listener) = self.listener.take() else { return Ok(()) };
        let cap = client_cap();
        thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&listener, cap, &controller, &on_crash))
            .map_err(|source| SocketError::Bind { path: self.path.clone(), source })?;
        Ok(())
    }

    /// [`ControlSocket::bind`], then [`ControlSocket::start`].
    pub fn serve(path: &Path, controller: Controller, on_crash: CrashHook) -> Result<Self, SocketError> {
        let mut socket = Self::bind(path)?;
        socket.start(controller, on_crash)?;
        Ok(socket)
    }
}

/// [`MAX_CLIENTS`], or a quarter of the file-descriptor limit when that is lower: the
/// machine needs descriptors of its own, and a refusal needs one to be written.
fn client_cap() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the rlimit it is given, which lives on the stack.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        usize::MAX
    };
    MAX_CLIENTS.min(soft / 4).max(1)
}

/// Decrements the count of clients when a client's thread ends (or never started).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: &UnixListener, cap: usize, controller: &Controller, on_crash: &CrashHook) {
    let clients = Arc::new(AtomicUsize::new(0));
    let mut out_of_fds = false;
    let mut failing = false;
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                if !out_of_fds {
                    error!(
                        "control socket: out of file descriptors ({e}); new clients wait until some close (said once)"
                    );
                    out_of_fds = true;
                }
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => continue,
            Err(e) => {
                if !failing {
                    warn!("control socket: accept failed: {e} (retrying; further failures are not logged)");
                    failing = true;
                }
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if clients.fetch_add(1, Ordering::SeqCst) >= cap {
            clients.fetch_sub(1, Ordering::SeqCst);
            debug!("control socket: client refused, {cap} already served");
            let _ = stream.set_write_timeout(Some(REFUSAL_TIMEOUT));
            let _ = writeln!(&stream, "{}", Response::from(ApiError::TooManyClients(cap)).to_line());
            continue;
        }
        let slot = Slot(clients.clone());
        let (controller, on_crash) = (controller.clone(), on_crash.clone());
        // A thread that cannot start drops its closure, and with it the slot.
        let _ = thread::Builder::new().name("control-client".into()).spawn(move || {
            let _slot = slot;
            serve_client(&stream, &controller, &on_crash, IDLE_TIMEOUT);
        });
    }
}

/// What a client sent next.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line, its newline stripped.
    Complete(Vec<u8>),
    /// The last bytes before the end of the stream, without a newline: a request too.
    Last(Vec<u8>),
    /// The stream ended after a newline.
    End,
    /// [`MAX_LINE`] bytes without a newline.
    TooLong,
    /// No complete line within the idle timeout.
    Idle,
    Failed(io::ErrorKind),
}

/// Reads lines of at most [`MAX_LINE`] bytes, each within `idle` of the last.
struct LineReader<'a> {
    stream: &'a UnixStream,
    buffer: Vec<u8>,
    idle: Duration,
}

impl<'a> LineReader<'a> {
    fn new(stream: &'a UnixStream, idle: Duration) -> Self {
        Self { stream, buffer: Vec::new(), idle }
    }

    fn next_line(&mut self) -> Line {
        let deadline = Instant::now() + self.idle;
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(at) = self.buffer.iter().position(|&b| b == b'\n') {
                if at >= MAX_LINE {
                    return Line::TooLong;
                }
                let mut line: Vec<u8> = self.buffer.drain(..=at).collect();
                line.pop();
                return Line::Complete(line);
            }
            if self.buffer.len() >= MAX_LINE {
                return Line::TooLong;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stream.set_read_timeout(Some(left)).is_err() {
                return Line::Idle;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) if self.buffer.is_empty() => return Line::End,
                Ok(0) => return Line::Last(std::mem::take(&mut self.buffer)),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Line::Idle,
                Err(e) => return Line::Failed(e.kind()),
            }
        }
    }
}

fn serve_client(stream: &UnixStream, controller: &Controller, on_crash: &CrashHook, idle: Duration) {
    // A client that reads no replies must not hold its thread for ever either.
    let _ = stream.set_write_timeout(Some(idle));
    let mut writer = stream;
    let mut lines = LineReader::new(stream, idle);
    loop {
        let (line, last) = match lines.next_line() {
            Line::Complete(line) => (line, false),
            Line::Last(line) => (line, true),
            Line::End => return,
            Line::TooLong => {
                let _ = writeln!(writer, "{}", Response::from(ApiError::TooLong(MAX_LINE)).to_line());
                return;
            }
            Line::Idle => {
                let _ = writeln!(writer, "{}", Response::from(ApiError::Idle(idle.as_secs())).to_line());
                return;
            }
            Line::Failed(kind) => {
                debug!("control client: {kind}");
                return;
            }
        };
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if !text.is_empty() {
            let (reply, after) = match api::parse(text) {
                Ok(request) => controller.handle(&request),
                Err(e) => (e.into(), AfterReply::Nothing),
            };
            // One write, newline included: a reply split in two costs the client a second
            // wake-up (milliseconds on a loaded host).
            let mut reply_line = reply.to_line();
            reply_line.push('\n');
            let sent = writer.write_all(reply_line.as_bytes()).and_then(|_| writer.flush());
            // A crash asked for happens whether or not the client stayed for the reply.
            if after == AfterReply::Crash {
                on_crash();
            }
            if sent.is_err() {
                return;
            }
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_complete_last_and_too_long() {
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(b"{\"cmd\":\"status\"}\n\n{\"cmd\":\"crash\"}").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut lines = LineReader::new(&server, Duration::from_secs(5));
        assert_eq!(lines.next_line(), Line::Complete(b"{\"cmd\":\"status\"}".to_vec()));
        assert_eq!(lines.next_line(), Line::Complete(Vec::new()));
        assert_eq!(lines.next_line(), Line::Last(b"{\"cmd\":\"crash\"}".to_vec()));

        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(&[b'x'; MAX_LINE]).unwrap();
        assert_eq!(LineReader::new(&server, Duration::from_secs(5)).next_line(), Line::TooLong);
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(b"ok\n").unwrap();
        drop(client);
        let mut lines = LineReader::new(&server, Duration::from_secs(5));
        assert_eq!(lines.next_line(), Line::Complete(b"ok".to_vec()));
        assert_eq!(lines.next_line(), Line::End);
    }

    #[test]
    fn a_client_trickling_bytes_times_out_by_the_line() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let trickle = thread::spawn(move || {
            for _ in 0..20 {
                if client.write_all(b"x").is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(30));
            }
        });
        let started = Instant::now();
        assert_eq!(LineReader::new(&server, Duration::from_millis(200)).next_line(), Line::Idle);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(2), "{took:?}");
        drop(server);
        trickle.join().unwrap();
    }

    #[test]
    fn the_cap_leaves_room_under_a_low_fd_limit() {
        let cap = client_cap();
        assert!((1..=MAX_CLIENTS).contains(&cap), "{cap}");
    }
}
