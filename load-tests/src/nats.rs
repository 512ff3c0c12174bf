//! A `nats-server` of the suite's own (JetStream, its store in a temporary
//! directory, a free port on 127.0.0.1), so that a fault case can kill it
//! and start it again, on the same port with what it stored, without
//! touching the server that others share.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::proc::free_port;

pub struct Nats {
    pub port: u16,
    dir: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Nats {
    /// Starts `nats-server -js` on a free port, and waits until it listens.
    pub async fn start() -> anyhow::Result<Nats> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("locus-faults-nats-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut n = Nats {
            port,
            dir,
            child: None,
        };
        n.resume().await?;
        Ok(n)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its log, appended across restarts.
    pub fn log(&self) -> PathBuf {
        self.dir.join("nats.log")
    }

    /// Starts it (again) on its port and store, and waits until it listens.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let port = self.port.to_string();
        let t = Instant::now();
        loop {
            let mut child = tokio::process::Command::new("nats-server")
                .args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd"])
                .arg(self.dir.join("store"))
                .arg("-l")
                .arg(self.log())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("start nats-server (Debian: apt-get install nats-server)")?;
            // Listening, or exited (the port not yet free after a kill).
            while t.elapsed() < Duration::from_secs(10) {
                if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
                {
                    self.child = Some(child);
                    return Ok(());
                }
                if child.try_wait()?.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if t.elapsed() >= Duration::from_secs(10) {
                let _ = child.kill().await;
                bail!(
                    "nats-server did not listen on {} within 10 s (log {})",
                    self.port,
                    self.log().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `kill -9`: gone without a goodbye; what JetStream wrote stays.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Stops the server and removes its files.
    pub async fn destroy(mut self) {
        let _ = self.kill9().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
