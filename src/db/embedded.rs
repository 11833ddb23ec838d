//! A throwaway PostgreSQL for development and tests, run from the machine's own binaries.
//!
//! `pgrelay serve` without `DATABASE_URL` uses it, and so does the test suite. The cluster lives in
//! a directory of its own, listens on a free loopback port, trusts local connections, and is
//! tuned for speed over durability (no fsync). Postgres refuses to run as root, so when we are
//! root the server runs as the `postgres` user.
//!
//! The server is started under a tiny shell guardian that reads its standard input, which is a
//! pipe from us: when this process ends, however it ends (even SIGKILL), the pipe closes and the
//! guardian stops Postgres. No orphaned clusters after a crashed test run.

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Stops Postgres (fast shutdown) when the pipe on its stdin closes or on SIGTERM/SIGINT.
const GUARDIAN: &str = r#""$@" & pg=$!
trap 'kill -INT $pg 2>/dev/null' TERM INT
read -r _
kill -INT $pg 2>/dev/null
wait $pg"#;

pub struct EmbeddedPostgres {
    bin: PathBuf,
    /// The user the server runs as, when we are root.
    owner: Option<(u32, u32)>,
    dir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    guardian: Option<Child>,
    /// True when this start created the cluster (so demo data can be loaded once).
    pub created: bool,
}

impl EmbeddedPostgres {
    /// Starts (creating if needed) a cluster in `dir/data`.
    pub fn start(dir: &Path) -> anyhow::Result<EmbeddedPostgres> {
        let bin = find_bin_dir()?;
        let owner = if is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut dir = dir.canonicalize()?;
        if let Some(owner) = owner {
            if !reachable_by(owner, &dir) {
                // The server runs as `postgres`, which cannot reach a directory under, say,
                // /root. Use one it can reach, stable for this path so data survives restarts.
                let fallback = std::env::temp_dir().join(format!("pgrelay-{:x}", path_hash(&dir)));
                tracing::warn!(wanted = %dir.display(), using = %fallback.display(),
                    "the postgres user cannot reach the data directory; using another");
                fs::create_dir_all(&fallback)?;
                dir = fallback;
            }
        }
        let data_dir = dir.join("data");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }

        let created = !data_dir.join("PG_VERSION").exists();
        if created {
            let mut initdb = Command::new(bin.join("initdb"));
            initdb
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                    "-D",
                ])
                .arg(&data_dir);
            run_as(&mut initdb, owner);
            let out = initdb.output().context("running initdb")?;
            if !out.status.success() {
                bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }

        let mut pg = EmbeddedPostgres {
            bin,
            owner,
            dir,
            data_dir,
            port: free_port()?,
            guardian: None,
            created,
        };
        pg.launch()?;
        Ok(pg)
    }

    /// Whether this machine has PostgreSQL server binaries to start one with.
    pub fn binaries_available() -> bool {
        find_bin_dir().is_ok()
    }

    /// Starts a stopped server again, on the same port and data (for testing restarts).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.launch()
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let log_path = self.dir.join("postgres.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&log_path, Some(uid), Some(gid))?;
        }
        let mut guardian = Command::new("sh");
        guardian
            .args(["-c", GUARDIAN, "pgrelay-postgres"])
            .arg(self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-p", &self.port.to_string()])
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ])
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "max_connections=300"])
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log);
        run_as(&mut guardian, self.owner);
        self.guardian = Some(guardian.spawn().context("starting postgres")?);
        self.wait_ready()
    }

    /// Connection string for one of the cluster's databases.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let (bin, dir) = (self.bin.clone(), self.dir.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args([
                    "-q",
                    "-U",
                    "postgres",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            let exited = match self.guardian.as_mut() {
                Some(child) => child.try_wait()?.is_some(),
                None => true,
            };
            if exited || Instant::now() > deadline {
                let log = fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
                bail!(
                    "embedded postgres did not start (is another `pgrelay serve` using {}?):\n{log}",
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.guardian.take() {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"stop\n");
            }
            let _ = child.wait();
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `PGRELAY_PG_BIN_DIR` if set, else the newest `/usr/lib/postgresql/<version>/bin`, else
/// wherever `initdb` is on the PATH.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PGRELAY_PG_BIN_DIR") {
        let dir = PathBuf::from(dir);
        anyhow::ensure!(
            dir.join("initdb").exists() && dir.join("postgres").exists(),
            "PGRELAY_PG_BIN_DIR={}: no initdb and postgres there",
            dir.display()
        );
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").exists() && dir.join("postgres").exists())
        .context("no PostgreSQL server binaries found (install postgresql, or set DATABASE_URL)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("running as root needs a `postgres` user to run the embedded database")
    };
    Ok((id("-u")?, id("-g")?))
}

fn run_as(command: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
}

/// Whether `user` can enter `dir` (every ancestor must be searchable by it).
fn reachable_by(user: (u32, u32), dir: &Path) -> bool {
    let mut test = Command::new("test");
    test.arg("-x").arg(dir);
    run_as(&mut test, Some(user));
    test.status().map(|s| s.success()).unwrap_or(false)
}

fn path_hash(path: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut hasher);
    hasher.finish()
}

fn free_port() -> anyhow::Result<u16> {
    let socket = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?.port())
}
