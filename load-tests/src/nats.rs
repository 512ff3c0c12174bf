//! A `nats-server` of the suite's own (JetStream, its store in a temporary
//! directory, a free port on 127.0.0.1), so that a fault case can kill it
//! and start it again, on the same port with what it stored, without
//! touching the server that others share; or three in one JetStream
//! cluster ([`NatsCluster`]), of which a case kills one.

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

/// One server of a [`NatsCluster`].
pub struct Node {
    /// Its server name (`-n`), as JetStream names a stream's leader.
    pub name: String,
    pub port: u16,
    child: Option<tokio::process::Child>,
}

/// Three `nats-server -js` (or as many as asked) in one JetStream cluster
/// on free loopback ports, each with its store in a temporary directory:
/// streams there keep three copies, so that a case can kill one server.
pub struct NatsCluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

impl NatsCluster {
    /// Starts `n` servers routed to each other, and waits until JetStream
    /// answers (the cluster has elected its meta leader).
    pub async fn start(n: usize) -> anyhow::Result<NatsCluster> {
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let dir = std::env::temp_dir().join(format!("locus-faults-nats-cluster-{}", ports[0].0));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
            .collect();
        let mut cluster = NatsCluster {
            nodes: Vec::new(),
            dir,
        };
        for (i, (port, cport)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let others: Vec<&str> = routes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, r)| r.as_str())
                .collect();
            let child = tokio::process::Command::new("nats-server")
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
                .args(["-n", &name, "--cluster_name", "locus-faults"])
                .args(["--cluster", &format!("nats://127.0.0.1:{cport}")])
                .args(["--routes", &others.join(",")])
                .arg("-sd")
                .arg(cluster.dir.join(&name))
                .arg("-l")
                .arg(cluster.dir.join(format!("{name}.log")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("start nats-server (Debian: apt-get install nats-server)")?;
            cluster.nodes.push(Node {
                name,
                port: *port,
                child: Some(child),
            });
        }
        let t = Instant::now();
        for node in &cluster.nodes {
            while tokio::net::TcpStream::connect(("127.0.0.1", node.port))
                .await
                .is_err()
            {
                if t.elapsed() > Duration::from_secs(10) {
                    bail!(
                        "nats-server {} did not listen on {} within 10 s (logs in {})",
                        node.name,
                        node.port,
                        cluster.dir.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let client = async_nats::connect(server_addrs(&cluster.url())?).await?;
        let js = async_nats::jetstream::new(client);
        // Ready once it places a stream of three copies (then removed).
        let probe = async_nats::jetstream::stream::Config {
            name: "LOCUS_FAULTS_READY".into(),
            subjects: vec!["locus-faults.ready".into()],
            storage: async_nats::jetstream::stream::StorageType::Memory,
            num_replicas: n,
            ..Default::default()
        };
        loop {
            match js.get_or_create_stream(probe.clone()).await {
                Ok(_) => {
                    js.delete_stream(&probe.name).await?;
                    return Ok(cluster);
                }
                Err(e) if t.elapsed() > Duration::from_secs(30) => bail!(
                    "the NATS cluster placed no stream of {n} copies within 30 s: {e} (logs in {})",
                    cluster.dir.display()
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// Every server's address, comma-separated (as `--nats-url` takes them).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Where the servers' logs are.
    pub fn logs(&self) -> PathBuf {
        self.dir.clone()
    }

    /// `kill -9` of the server named `name`.
    pub async fn kill9(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .with_context(|| format!("no NATS server named {name}"))?;
        if let Some(mut c) = node.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Stops every server and removes their files.
    pub async fn destroy(mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill().await;
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `urls`, comma-separated as `--nats-url` takes them, as the NATS client
/// takes several servers.
pub fn server_addrs(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    urls.split(',')
        .map(|u| {
            u.parse()
                .with_context(|| format!("the NATS server address {u:?}"))
        })
        .collect()
}
