//! `locus serve` as a child process on fixed ports (so that it can be
//! killed and started again where its clients expect it), and what /proc
//! says about a process.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use sqlx::{Connection, PgConnection};

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The `locus` binary beside the running one (cargo builds them together).
pub fn sibling_locus() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name("locus"))
}

/// A `locus serve` child with `--auth off`, and how to reach it.
pub struct Locus {
    pub child: tokio::process::Child,
    pub pid: u32,
    binary: PathBuf,
    url: String,
    pub grpc: u16,
    pub http: u16,
    pub metrics: u16,
    extra: Vec<String>,
    /// Where its log (stderr) goes, appended across restarts.
    pub log: PathBuf,
}

impl Locus {
    /// Starts locus against `url` on free ports, with `extra` flags, and
    /// waits until it is ready.
    pub async fn start(binary: &Path, url: &str, extra: &[&str]) -> anyhow::Result<Locus> {
        let (grpc, http, metrics) = (free_port()?, free_port()?, free_port()?);
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let log = std::env::temp_dir().join(format!("locus-{grpc}.log"));
        let child = spawn(binary, url, (grpc, http, metrics), &extra, &log)?;
        let mut l = Locus {
            log,
            pid: child.id().context("locus pid")?,
            child,
            binary: binary.to_path_buf(),
            url: url.to_string(),
            grpc,
            http,
            metrics,
            extra,
        };
        l.wait_ready(Duration::from_secs(60)).await?;
        Ok(l)
    }

    pub fn grpc_target(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    pub fn http_target(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// `kill -9`: no flush, no goodbye.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Starts it again on the same ports, and waits until it is ready.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let t = Instant::now();
        // The old sockets may linger a moment.
        loop {
            match spawn(
                &self.binary,
                &self.url,
                (self.grpc, self.http, self.metrics),
                &self.extra,
                &self.log,
            ) {
                Ok(c) => {
                    self.child = c;
                    break;
                }
                Err(e) if t.elapsed() > Duration::from_secs(10) => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        self.pid = self.child.id().context("locus pid")?;
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// `GET /readyz`: `Some(true)` ready, `Some(false)` not, `None` no answer.
    pub async fn ready(&self) -> Option<bool> {
        let url = format!("http://127.0.0.1:{}/readyz", self.metrics);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .ok()?;
        client
            .get(url)
            .send()
            .await
            .ok()
            .map(|r| r.status().is_success())
    }

    async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let t = Instant::now();
        while self.ready().await != Some(true) {
            if let Some(status) = self.child.try_wait()? {
                bail!("locus exited during start: {status}");
            }
            if t.elapsed() > limit {
                bail!("locus did not become ready in {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(
            reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics))
                .await?
                .text()
                .await?,
        )
    }
}

fn spawn(
    binary: &Path,
    url: &str,
    (grpc, http, metrics): (u16, u16, u16),
    extra: &[String],
    log: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    tokio::process::Command::new(binary)
        .args(["serve", "--database-url", url, "--auth", "off"])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", binary.display()))
}

/// A field of /proc/<pid>/status, in MiB (`VmRSS`, `VmHWM`).
pub fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resident memory now, MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS:")
}

/// Peak resident memory, MiB.
pub fn rss_peak_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmHWM:")
}

/// Open file descriptors.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

fn ticks_per_sec() -> f64 {
    100.0 // USER_HZ on Linux
}

/// (utime + stime, cutime + cstime, ppid) of a process, in seconds.
pub fn proc_times(pid: u32) -> Option<(f64, f64, u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // After the comm: state=0, ppid=1, ..., utime=11, stime=12, cutime=13, cstime=14.
    Some((
        (n(11) + n(12)) / ticks_per_sec(),
        (n(13) + n(14)) / ticks_per_sec(),
        n(1) as u32,
        comm,
    ))
}

/// The pid of the postmaster serving `url` (on this machine).
pub async fn postmaster(url: &str) -> anyhow::Result<u32> {
    let mut c = PgConnection::connect(url).await?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut c)
        .await?;
    proc_times(backend as u32)
        .map(|t| t.2)
        .context("read the postmaster's pid from /proc")
}

/// CPU seconds of one PostgreSQL cluster so far: the postmaster, its live
/// children, and the children that exited (counted in its cutime/cstime).
pub fn pg_cpu(postmaster: u32) -> f64 {
    let mut total = proc_times(postmaster).map_or(0.0, |(own, reaped, _, _)| own + reaped);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && let Some((own, _, ppid, _)) = proc_times(pid)
                && ppid == postmaster
            {
                total += own;
            }
        }
    }
    total
}
