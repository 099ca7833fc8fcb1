//! Child processes — one way to kill them ([`Proc`]) — and the services the
//! project's scripts run: Apache Kafka, a schema registry, the examples' Python.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Sends SIGKILL to a child and reaps it.
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The log filter of child processes: `warn`, or `ESE_TEST_RUST_LOG` when
/// set (to see a failing scenario's rebalances, say).
pub fn child_log() -> String {
    std::env::var("ESE_TEST_RUST_LOG").unwrap_or_else(|_| "warn".into())
}

/// A data folder for `ese broker --storage` (durable across a broker
/// restart), removed when dropped: the journal `ese up` runs by default
/// ([`BrokerDb::new`]) or a SQLite file ([`BrokerDb::sqlite`]).
pub struct BrokerDb {
    dir: PathBuf,
    sqlite: bool,
}

impl BrokerDb {
    pub fn new() -> Self {
        Self::in_dir(false)
    }

    pub fn sqlite() -> Self {
        Self::in_dir(true)
    }

    fn in_dir(sqlite: bool) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ese-broker-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("broker data folder");
        Self { dir, sqlite }
    }

    /// The `--storage` URL.
    pub fn storage(&self) -> String {
        if self.sqlite {
            format!("sqlite://{}", self.dir.join("broker.db").display())
        } else {
            format!("file://{}", self.dir.display())
        }
    }
}

impl Drop for BrokerDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `ese broker` in a child process on `port` with `storage` (`memory://…`,
/// `file://…`, `sqlite://…`), returned once it accepts connections.
pub fn spawn_broker(port: u16, storage: &str) -> Proc {
    let broker = Proc::new(
        Command::new(env!("CARGO_BIN_EXE_ese"))
            .args(["broker", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--storage", storage])
            .env("RUST_LOG", child_log())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn broker"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "broker did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    broker
}

/// `kill SIG PID`, e.g. `-STOP` to freeze a process and `-CONT` to resume it.
pub fn signal(pid: &str, sig: &str) {
    let status = Command::new("kill")
        .args([sig, pid])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

/// A child `ese` killed when the test ends, however it ends.
pub struct Proc(Option<Child>);

impl Proc {
    pub fn new(child: Child) -> Proc {
        Proc(Some(child))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }

    pub fn kill9(&mut self) {
        if let Some(c) = &mut self.0 {
            kill9(c);
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn terminate(mut self) {
        if let Some(c) = self.0.take() {
            terminate(c).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// SIGTERM (a graceful stop: drain, commit, leave the group) and wait for the exit.
pub async fn terminate(mut child: Child) {
    let pid = child.id().to_string();
    tokio::task::spawn_blocking(move || {
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = child.wait().expect("wait for ese");
        assert!(status.success(), "ese exited with {status} after SIGTERM");
    })
    .await
    .expect("join");
}

/// A free local port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The Apache Kafka cluster of `scripts/kafka`: three brokers with a
/// SASL_SSL listener, started once per test binary (or found running).
pub struct Cluster {
    /// PLAINTEXT bootstrap list.
    pub brokers: String,
    /// SASL_SSL bootstrap list (user `ese`, [`Cluster::PASSWORD`]).
    pub sasl_ssl_brokers: String,
    /// The test CA that signed the brokers' certificates.
    pub ca: String,
}

impl Cluster {
    /// The script's default SASL password for user `ese`.
    pub const PASSWORD: &str = "ese-secret";
    pub const USER: &str = "ese";

    /// `scripts/kafka up --brokers 3 --sasl-ssl` (idempotent), once.
    pub fn get() -> &'static Cluster {
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            let out = Self::script(&["up", "--brokers", "3", "--sasl-ssl"]);
            Cluster {
                brokers: printed(&out, "KAFKA_BROKERS"),
                sasl_ssl_brokers: printed(&out, "KAFKA_SASL_SSL_BROKERS"),
                ca: printed(&out, "KAFKA_CA"),
            }
        })
    }

    /// Runs `scripts/kafka ARGS…`; its stdout, or a panic with its stderr.
    pub fn script(args: &[&str]) -> String {
        project_script("kafka", args)
    }

    /// SIGKILL broker `id`.
    pub fn kill(&self, id: i32) {
        Self::script(&["kill", &id.to_string()]);
    }

    /// Starts broker `id` again and waits until it is back in the cluster.
    pub fn start(&self, id: i32) {
        Self::script(&["start", &id.to_string()]);
    }

    /// The node id of the active KRaft controller.
    pub fn controller(&self) -> i32 {
        Self::script(&["controller"])
            .trim()
            .parse()
            .expect("scripts/kafka controller prints a node id")
    }

    /// Per broker id, how many partitions of `topics` it leads.
    pub fn leaders(&self, topics: &[String]) -> std::collections::BTreeMap<i32, usize> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .expect("metadata client");
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("cluster metadata");
        let mut led = std::collections::BTreeMap::new();
        for t in md
            .topics()
            .iter()
            .filter(|t| topics.iter().any(|n| n == t.name()))
        {
            for p in t.partitions() {
                *led.entry(p.leader()).or_insert(0) += 1;
            }
        }
        led
    }
}

/// Runs a script of the project's `scripts/` folder; its stdout, or a panic
/// with its stderr.
pub fn project_script(name: &str, args: &[&str]) -> String {
    let out = Command::new(format!("{}/scripts/{name}", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{name}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{name} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of `NAME=value` in a script's output.
fn printed(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in: {out}"))
        .to_string()
}

/// A real schema registry (`scripts/schema-registry up`: Apicurio with its
/// Confluent-compatible API), started once per test binary or found running.
pub struct Registry {
    pub url: String,
    pub username: String,
    pub password: String,
}

impl Registry {
    pub fn get() -> &'static Registry {
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        REGISTRY.get_or_init(|| {
            let out = project_script("schema-registry", &["up"]);
            Registry {
                url: printed(&out, "SCHEMA_REGISTRY_URL"),
                username: printed(&out, "SCHEMA_REGISTRY_USERNAME"),
                password: printed(&out, "SCHEMA_REGISTRY_PASSWORD"),
            }
        })
    }
}

/// The Python of the examples' environment (`scripts/python-examples`).
pub fn examples_python() -> String {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            project_script("python-examples", &[])
                .lines()
                .last()
                .expect("scripts/python-examples prints the python")
                .trim()
                .to_string()
        })
        .clone()
}
