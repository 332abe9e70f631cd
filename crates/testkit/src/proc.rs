//! Small process and port helpers.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A loopback port that was free a moment ago (bind to port 0, read it, release it).
///
/// Another process may take it before you bind it; prefer binding port 0 yourself when you can.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until something accepts TCP connections on `addr`, or fails after `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing listens on {addr} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a TCP connection to `addr` is refused right now (the port is closed).
pub fn port_is_closed(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err()
}

/// A child process that is killed (and reaped) when this is dropped, so a failing test or an
/// early return never leaves a server or a `bootstrap` running. Derefs to the [`Child`].
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_bindable_and_wait_for_port_sees_a_listener() {
        let port = free_port().unwrap();
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let addr = listener.local_addr().unwrap();
        wait_for_port(addr, Duration::from_secs(2)).unwrap();
        drop(listener);
        assert!(port_is_closed(addr));
        assert!(wait_for_port(addr, Duration::from_millis(100)).is_err());
    }
}

/// A Lambda binary (`bootstrap`, `provisioner`) run for the Runtime API emulator: nothing of
/// the test's environment but `env`, its stdout (the JSON log lines) kept in a file, its stderr
/// piped (what a failed cold start says). Killed when dropped.
#[derive(Debug)]
pub struct FunctionProcess {
    /// The process.
    pub child: KillOnDrop,
    log: tempfile::NamedTempFile,
}

impl FunctionProcess {
    /// Starts `exe` with exactly `env`.
    pub fn spawn(exe: &str, env: &[(&str, String)]) -> Result<FunctionProcess> {
        let log = tempfile::NamedTempFile::new().context("a log file")?;
        let child = std::process::Command::new(exe)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(log.reopen().context("the log file")?)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {exe}"))?;
        Ok(FunctionProcess {
            child: KillOnDrop(child),
            log,
        })
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}
