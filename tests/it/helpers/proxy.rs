//! A TCP proxy a test puts in front of a service (Postgres) to take its path down or
//! silence it, without stopping the service other tests share.

/// What a [`Proxy`] does with the traffic to its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Up,
    /// Open connections are closed, new ones refused: a server that went away.
    Down,
    /// Open connections stay open and silent, new ones are accepted and never answered:
    /// a dropped network path or a frozen server, where a query waits for ever.
    Silent,
}

/// A TCP proxy in front of a service, whose path a test can take down or silence and
/// restore: a Postgres outage without stopping the Postgres other tests share.
pub struct Proxy {
    pub port: u16,
    path: tokio::sync::watch::Sender<Path>,
    task: tokio::task::JoinHandle<()>,
}

/// Waits until the proxy's path satisfies `f` (the watch guard never outlives the call).
async fn path_until(rx: &mut tokio::sync::watch::Receiver<Path>, f: impl Fn(Path) -> bool) {
    let _ = rx.wait_for(|p| f(*p)).await;
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (path, _) = tokio::sync::watch::channel(Path::Up);
        let state = path.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut rx = state.subscribe();
                let now = *rx.borrow_and_update();
                match now {
                    Path::Down => drop(inbound),
                    // Held, never answered, closed once the path is back.
                    Path::Silent => {
                        tokio::spawn(async move {
                            path_until(&mut rx, |p| p != Path::Silent).await;
                            drop(inbound);
                        });
                    }
                    Path::Up => {
                        tokio::spawn(async move {
                            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await
                            else {
                                return;
                            };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                                _ = path_until(&mut rx, |p| p != Path::Up) => {
                                    // Silent: both sockets stay open until the path changes.
                                    path_until(&mut rx, |p| p != Path::Silent).await;
                                }
                            }
                        });
                    }
                }
            }
        });
        Proxy { port, path, task }
    }

    pub fn set_down(&self, down: bool) {
        self.path
            .send_replace(if down { Path::Down } else { Path::Up });
    }

    pub fn set_silent(&self, silent: bool) {
        self.path
            .send_replace(if silent { Path::Silent } else { Path::Up });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
