//! A throwaway PostgreSQL cluster of the suite's own (initdb in a temporary
//! directory, on a free port), so that a fault case can really stop and
//! start the server without touching the PostgreSQL that others share.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tokio::process::Command;

use crate::proc::free_port;

pub struct Cluster {
    bindir: PathBuf,
    dir: PathBuf,
    pub port: u16,
    /// Run the server as `postgres`: PostgreSQL refuses to run as root.
    as_postgres: bool,
}

impl Cluster {
    /// Creates and starts a cluster with the server binaries in `bindir`
    /// (default: the newest under /usr/lib/postgresql, else `pg_config
    /// --bindir`), trust authentication on 127.0.0.1 only.
    pub async fn create(bindir: Option<PathBuf>) -> anyhow::Result<Cluster> {
        let bindir = match bindir {
            Some(b) => b,
            None => find_bindir().await?,
        };
        if !bindir.join("initdb").exists() {
            bail!(
                "no initdb in {}: give --pg-bindir, or --postgres shared",
                bindir.display()
            );
        }
        let dir = std::env::temp_dir().join(format!("locus-faults-pg-{}", std::process::id()));
        let c = Cluster {
            as_postgres: is_root()?,
            port: free_port()?,
            bindir,
            dir,
        };
        let data = c.data();
        c.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )
        .await?;
        c.start().await?;
        Ok(c)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub async fn start(&self) -> anyhow::Result<()> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300",
            self.port,
            self.dir.display()
        );
        let log = self.log().display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-t",
                "120",
                "-o",
                &opts,
                "start",
            ],
        )
        .await
    }

    /// `pg_ctl stop -m fast`: sessions are ended, new connections refused.
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"])
            .await
    }

    /// Stops the server and removes its files.
    pub async fn destroy(self) {
        let _ = self
            .run(
                "pg_ctl",
                &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
            )
            .await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    async fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = self.bindir.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .output()
            .await
            .with_context(|| format!("run {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{program} {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

async fn find_bindir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .await
        .context("no /usr/lib/postgresql/*/bin/initdb and no pg_config")?;
    Ok(Path::new(String::from_utf8_lossy(&out.stdout).trim()).to_path_buf())
}

fn is_root() -> anyhow::Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0"))
}
