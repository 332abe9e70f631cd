//! Runs an axum router, or any accept loop, on a loopback port, on its own thread with its
//! own tokio runtime.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};
use tokio::sync::oneshot;

/// The `IP:PORT` of an `http://IP:PORT[/...]` base URL, as the servers in this crate give.
pub(crate) fn socket_addr_of(url: &str) -> Result<SocketAddr> {
    let authority = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// upstreams are supported, got {url}"))?;
    let authority = authority.split('/').next().unwrap_or_default();
    authority
        .parse()
        .with_context(|| format!("{authority} is not IP:PORT"))
}

/// A running server; dropping it stops the server and closes its port.
#[derive(Debug)]
pub(crate) struct BackgroundServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundServer {
    /// Binds `127.0.0.1:0` and serves `router` there until dropped.
    pub(crate) fn start(name: &str, router: axum::Router) -> Result<Self> {
        Self::spawn(name, |listener| async move {
            if let Err(e) = axum::serve(listener, router).into_future().await {
                eprintln!("testkit server stopped: {e}");
            }
        })
    }

    /// Binds `127.0.0.1:0` and runs `serve(listener)` on a thread of its own, in a
    /// current-thread tokio runtime, until dropped. Dropping is not graceful: long polls (the
    /// Lambda `next` call) and held answers would keep it waiting forever, so the runtime is
    /// dropped instead, which cancels every connection task.
    pub(crate) fn spawn<F, Fut>(name: &str, serve: F) -> Result<Self>
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
            .with_context(|| format!("{name}: binding a loopback port"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (shutdown, stop) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();

        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!(e).context("building tokio runtime")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow!(e).context("registering listener")));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    tokio::select! {
                        () = serve(listener) => {}
                        _ = stop => {}
                    }
                });
            })
            .with_context(|| format!("{name}: spawning server thread"))?;

        ready_rx
            .recv()
            .map_err(|_| anyhow!("{name}: server thread exited before it was ready"))??;
        Ok(Self {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
