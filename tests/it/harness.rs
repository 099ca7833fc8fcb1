//! `TestApp`: a fresh database and fresh topic names per test, the real
//! config, and helpers that read like what a user would check.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use ese::codec::Codec;
use ese::config::Settings;
use ese::stages::Deps;
use figment::providers::{Format, Serialized};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Every table of the data model, in dependency order.
pub const TABLES: [&str; 9] = [
    "users",
    "templates",
    "segments",
    "campaigns",
    "messages",
    "delivery_receipts",
    "inbound_events",
    "consent_events",
    "fanout_progress",
];

/// The admin URL tests create their databases through.
fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// `KAFKA_BROKERS`, or one embedded broker for the whole test binary, on a
/// runtime of its own so it outlives every test's runtime.
pub fn brokers() -> String {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS
        .get_or_init(|| {
            if let Ok(b) = std::env::var("KAFKA_BROKERS")
                && !b.trim().is_empty()
            {
                return b;
            }
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().expect("broker runtime");
                rt.block_on(async move {
                    let broker = ese::broker::start("127.0.0.1:0", "memory://ese-tests/")
                        .await
                        .expect("embedded broker starts");
                    tx.send(broker.bootstrap.clone()).expect("send address");
                    std::future::pending::<()>().await;
                    drop(broker);
                });
            });
            rx.recv_timeout(Duration::from_secs(30))
                .expect("embedded broker address")
        })
        .clone()
}

pub struct TestApp {
    pub settings: Settings,
    pub pool: Pool,
    pub codec: Codec,
    pub producer: ese::kafka::Producer,
    pub db_name: String,
    /// The server the test database was created on (and is dropped from).
    pub admin_url: String,
    pub prefix: String,
    /// The same settings as a file, for `ese` child processes.
    pub config_path: PathBuf,
}

impl TestApp {
    /// A migrated fresh database, prefixed topics created, settings pointing at both.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(toml::Table::new()).await
    }

    /// Like [`TestApp::spawn`], with extra config merged on top (`[pipelines.users] batch-size = 10`, …).
    /// A `[database] url` there names the server to create the test database
    /// on instead of `DATABASE_URL`'s.
    pub async fn spawn_with(mut extra: toml::Table) -> TestApp {
        static LOGS: std::sync::Once = std::sync::Once::new();
        LOGS.call_once(|| {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tansu=off"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        });
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("t{}", &id[..10]);
        let db_name = format!("ese_test_{}", &id[..16]);
        let admin_url = extra
            .get_mut("database")
            .and_then(|d| d.as_table_mut())
            .and_then(|d| d.remove("url"))
            .and_then(|u| u.as_str().map(str::to_string))
            .unwrap_or_else(admin_url);
        let admin = connect(&admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name}"))
            .await
            .expect("create test database");
        let mut url = url::Url::parse(&admin_url).expect("DATABASE_URL parses");
        url.set_path(&format!("/{db_name}"));
        let db_url = url.to_string();
        ese::db::migrate(&db_url).await.expect("migrations apply");

        // Every topic and group id gets the test's prefix.
        let defaults = Settings::load_with(None, Serialized::defaults(serde_json::json!({})))
            .expect("default settings");
        let mut pipelines = toml::Table::new();
        for (name, p) in &defaults.pipelines {
            let mut t = toml::Table::new();
            t.insert("group-id".into(), format!("{prefix}.{}", p.group_id).into());
            t.insert(
                "inputs".into(),
                p.inputs
                    .iter()
                    .map(|i| format!("{prefix}.{i}"))
                    .collect::<Vec<_>>()
                    .into(),
            );
            t.insert("dlq".into(), format!("{prefix}.{}", p.dlq).into());
            let mut outs = toml::Table::new();
            for (k, v) in &p.outputs {
                outs.insert(k.clone(), format!("{prefix}.{v}").into());
            }
            t.insert("outputs".into(), outs.into());
            pipelines.insert(name.clone(), t.into());
        }
        let mut doc: toml::Table = toml::from_str(&format!(
            r#"
            [database]
            url = "{db_url}"
            pool-size = 8
            [kafka]
            brokers = "{}"
            partitions = 4
            session-timeout = "6s"
            statistics-interval = "1s"
            [metrics]
            listen = "127.0.0.1:0"
            [bridge]
            public-url = "{}"
            status-topic = "{prefix}.webhooks.status.raw"
            inbound-topic = "{prefix}.webhooks.inbound.raw"
            produce-timeout = "3s"
            "#,
            brokers(),
            crate::fixtures::PUBLIC_URL,
        ))
        .expect("test config");
        doc.insert("pipelines".into(), pipelines.into());
        merge(&mut doc, extra);
        let text = toml::to_string(&doc).expect("config serializes");
        let config_path = std::env::temp_dir().join(format!("{prefix}.toml"));
        std::fs::File::create(&config_path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("write test config");
        // The file again as the top layer, so DATABASE_URL / KAFKA_BROKERS in
        // the environment cannot point a test at a shared database.
        let settings =
            Settings::load_with(Some(&config_path), figment::providers::Toml::string(&text))
                .expect("test settings load");
        ese::kafka::create_topics(&settings.kafka, &settings.all_topics())
            .await
            .expect("topics created");
        let pool = ese::db::pool(&settings.database).expect("pool");
        let producer = ese::kafka::Producer::new(&settings.kafka).expect("producer");
        let codec = Codec::single_object().expect("codec");
        TestApp {
            settings,
            pool,
            codec,
            producer,
            db_name,
            admin_url,
            prefix,
            config_path,
        }
    }

    /// The test's name for a default topic (`users.upserts` → `tXXXX.users.upserts`).
    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    pub fn deps(&self) -> Deps {
        Deps {
            settings: self.settings.clone(),
            pool: self.pool.clone(),
            producer: self.producer.clone(),
            codec: self.codec.clone(),
        }
    }

    /// Runs `stage` in this process until the returned handle is stopped.
    pub fn start_stage(&self, stage: &str) -> RunningStage {
        let token = CancellationToken::new();
        let deps = self.deps();
        let name = stage.to_string();
        let t = token.clone();
        let handle = tokio::spawn(async move { ese::stages::run(&name, deps, t).await });
        RunningStage { token, handle }
    }

    /// Starts the webhook bridge on a free port, trusting `fixtures::TOKEN`.
    pub async fn start_bridge(&self) -> RunningBridge {
        self.start_bridge_on("127.0.0.1:0").await
    }

    /// Starts the webhook bridge on `addr`.
    pub async fn start_bridge_on(&self, addr: &str) -> RunningBridge {
        let bridge = ese::bridge::Bridge::new(
            &self.settings,
            vec![crate::fixtures::TOKEN.to_string()],
            self.pool.clone(),
        )
        .expect("bridge");
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind bridge");
        let addr = listener.local_addr().expect("bridge address");
        let token = CancellationToken::new();
        let t = token.clone();
        let router = bridge.router();
        tokio::spawn(async move { ese::bridge::serve_on(listener, router, t).await });
        RunningBridge {
            base: format!("http://{addr}"),
            token,
            http: ese::http::client_builder().build().expect("http client"),
        }
    }

    /// Starts the admin API on a free port with bearer token [`ADMIN_TOKEN`].
    pub async fn start_api(&self) -> RunningApi {
        let deps = self.deps();
        let admin = ese::campaigns::api::Admin::new(
            self.pool.clone(),
            deps.commands().expect("commands"),
            Some(ADMIN_TOKEN.to_string()),
            self.settings.campaigns.max_filter_depth,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind api");
        let addr = listener.local_addr().expect("api address");
        let token = CancellationToken::new();
        let t = token.clone();
        let router = admin.router();
        tokio::spawn(async move { ese::bridge::serve_on(listener, router, t).await });
        RunningApi {
            base: format!("http://{addr}"),
            token,
            http: ese::http::client_builder().build().expect("http client"),
        }
    }

    /// Seeds `n` opted-in users `+1415` + (2000000 + i) (valid US numbers) with `attributes(i)`.
    pub async fn seed_users(&self, n: i64, attributes: &str) {
        let c = self.pool.get().await.unwrap();
        c.execute(
            &format!(
                "INSERT INTO users (phone_number, attributes)
                 SELECT '+1415' || (2000000 + i)::text, {attributes} FROM generate_series(1, $1::bigint) i"
            ),
            &[&n],
        )
        .await
        .expect("seed users");
    }

    /// Decoded records of the commands topic (reads until `n` or `timeout`).
    pub async fn commands(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Vec<ese::records::CampaignCommand> {
        let mut out = Vec::new();
        for r in self.read_topic(&self.topic("campaigns.commands"), n, timeout) {
            out.push(
                self.codec
                    .decode(r.payload.as_deref().unwrap_or_default())
                    .await
                    .expect("command decodes"),
            );
        }
        out
    }

    /// `ese ARGS…` against this test's settings, database, broker and
    /// credentials, with extra environment.
    fn ese(&self, args: &[&str], env: &[(&str, String)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ese"));
        cmd.arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env("DATABASE_URL", &self.settings.database.url)
            .env("KAFKA_BROKERS", &self.settings.kafka.brokers)
            .env("RUST_LOG", child_log())
            .env("TWILIO_ACCOUNT_SID", SIM_ACCOUNT)
            .env("TWILIO_AUTH_TOKEN", crate::fixtures::TOKEN)
            .env("ESE_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts `ese ARGS…` as a child process against this test's settings.
    pub fn spawn_ese(&self, args: &[&str]) -> Child {
        self.ese(args, &[])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn ese")
    }

    /// Starts `ese ARGS…` with extra environment and its stdout piped.
    pub fn spawn_ese_piped(&self, args: &[&str], env: &[(&str, String)]) -> Child {
        self.ese(args, env)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ese")
    }

    /// Runs `ese ARGS…` to completion; returns (exit success, stdout, stderr).
    pub async fn run_ese(&self, args: &[&str]) -> (bool, String, String) {
        self.run_ese_with(args, &[]).await
    }

    /// Like [`TestApp::run_ese`] with extra environment.
    pub async fn run_ese_with(
        &self,
        args: &[&str],
        env: &[(&str, String)],
    ) -> (bool, String, String) {
        let mut cmd = self.ese(args, env);
        cmd.stderr(Stdio::piped());
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("join")
            .expect("run ese");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Produces one record and waits for the broker's acknowledgement.
    pub async fn produce(&self, topic: &str, key: &[u8], payload: &[u8]) {
        self.producer
            .send(
                FutureRecord::to(topic).key(key).payload(payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce acknowledged");
    }

    /// Produces many records concurrently, all acknowledged on return.
    pub async fn produce_all(&self, topic: &str, records: Vec<(Vec<u8>, Vec<u8>)>) {
        for chunk in records.chunks(2000) {
            let futures = chunk.iter().map(|(k, v)| {
                self.producer.send(
                    FutureRecord::to(topic)
                        .key(k.as_slice())
                        .payload(v.as_slice()),
                    Duration::from_secs(60),
                )
            });
            for r in futures::future::join_all(futures).await {
                r.map_err(|(e, _)| e).expect("produce acknowledged");
            }
        }
    }

    /// One SQL count.
    pub async fn count(&self, sql: &str) -> i64 {
        let c = self.pool.get().await.expect("db connection");
        c.query_one(sql, &[]).await.expect("count query").get(0)
    }

    /// Polls `sql` (a count) until it equals `expected`; panics with the last value after `timeout`.
    pub async fn wait_for_count(&self, sql: &str, expected: i64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = -1;
        while Instant::now() < deadline {
            if let Ok(c) = self.pool.get().await
                && let Ok(row) = c.query_one(sql, &[]).await
            {
                last = row.get(0);
                if last == expected {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("timed out waiting for `{sql}` = {expected}; last value {last}");
    }

    /// Reads every record of `topic` until `n` were seen or `timeout` passed.
    pub fn read_topic(&self, topic: &str, n: usize, timeout: Duration) -> Vec<InRecordView> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.settings.kafka.brokers)
            .set("group.id", format!("{}.reader", self.prefix))
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader consumer");
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        for t in md.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .expect("partition");
            }
        }
        consumer.assign(&tpl).expect("assign");
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                out.push(InRecordView {
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| {
                                    (
                                        h.key.to_string(),
                                        String::from_utf8_lossy(h.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                });
            }
        }
        out
    }

    /// Waits until `stage`'s consumer group has committed every record on its
    /// inputs (what was produced before this call has been fully processed).
    pub async fn wait_caught_up(&self, stage: &str, timeout: Duration) {
        self.wait_group_caught_up(stage, "", timeout).await;
    }

    /// Like [`TestApp::wait_caught_up`] for the stage's group id + `suffix` (a replay group).
    pub async fn wait_group_caught_up(&self, stage: &str, suffix: &str, timeout: Duration) {
        let mut p = self.settings.pipeline(stage).expect("pipeline").clone();
        p.group_id.push_str(suffix);
        let deadline = Instant::now() + timeout;
        loop {
            let behind = group_lag(&self.settings, &p.group_id, &p.inputs).await;
            if behind == Some(0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{stage} not caught up after {timeout:?}: {behind:?} behind"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Every table as text, row by row, in a stable order.
    pub async fn dump(&self) -> Vec<String> {
        let c = self.pool.get().await.unwrap();
        let mut out = Vec::new();
        for table in TABLES {
            let key = if table == "fanout_progress" {
                "campaign_id"
            } else {
                "id"
            };
            for r in c
                .query(
                    &format!("SELECT t::text FROM {table} t ORDER BY {key}"),
                    &[],
                )
                .await
                .unwrap()
            {
                out.push(format!("{table}: {}", r.get::<_, String>(0)));
            }
        }
        out
    }

    /// Terminates every connection to this test's database (Postgres "lost").
    pub async fn kill_db_connections(&self) -> i64 {
        let admin = connect(&self.admin_url).await;
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.db_name],
            )
            .await
            .expect("terminate backends");
        rows.len() as i64
    }
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct InRecordView {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

impl InRecordView {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let db = self.db_name.clone();
        let admin_url = self.admin_url.clone();
        let _ = std::fs::remove_file(&self.config_path);
        // Dropped from inside a runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Runtime::new() {
                rt.block_on(async move {
                    if let Ok((c, conn)) =
                        tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await
                    {
                        tokio::spawn(conn);
                        let _ = c
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

/// A stage running in the test process.
pub struct RunningStage {
    pub token: CancellationToken,
    pub handle: JoinHandle<anyhow::Result<()>>,
}

impl RunningStage {
    /// Graceful stop (as on SIGTERM); panics if the stage had failed.
    pub async fn stop(self) {
        self.token.cancel();
        self.handle
            .await
            .expect("stage task")
            .expect("stage stopped cleanly");
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    c
}

fn merge(into: &mut toml::Table, extra: toml::Table) {
    for (k, v) in extra {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Sends SIGKILL to a child and reaps it.
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The log filter of child processes: `warn`, or `ESE_TEST_RUST_LOG` when
/// set (to see a failing scenario's rebalances, say).
fn child_log() -> String {
    std::env::var("ESE_TEST_RUST_LOG").unwrap_or_else(|_| "warn".into())
}

/// A SQLite file for `ese broker --storage` (durable across a broker
/// restart), removed with its WAL files when dropped.
pub struct BrokerDb(PathBuf);

impl BrokerDb {
    pub fn new() -> Self {
        Self(std::env::temp_dir().join(format!("ese-broker-{}.db", uuid::Uuid::new_v4().simple())))
    }

    /// The `--storage` URL.
    pub fn storage(&self) -> String {
        format!("sqlite://{}", self.0.display())
    }
}

impl Drop for BrokerDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

/// `ese broker` in a child process on `port` with `storage` (`memory://…`,
/// `sqlite://…`), returned once it accepts connections.
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

/// The bridge running in the test process.
pub struct RunningBridge {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub token: CancellationToken,
    pub http: reqwest::Client,
}

impl RunningBridge {
    /// POSTs a form body with an `X-Twilio-Signature`.
    pub async fn post_form(
        &self,
        path: &str,
        body: String,
        signature: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(sig) = signature {
            req = req.header("x-twilio-signature", sig);
        }
        req.send().await.expect("bridge answers")
    }

    /// POSTs a fixture as the provider would.
    pub async fn deliver(&self, f: &crate::fixtures::Fixture) -> reqwest::Response {
        self.post_form(f.path, f.form(), Some(f.signature)).await
    }
}

impl Drop for RunningBridge {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

pub const ADMIN_TOKEN: &str = "test-admin-token";

/// The account the provider simulator accepts in tests.
pub const SIM_ACCOUNT: &str = "ACtest0000000000000000000000000000";

/// A free local port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The whole loop on one machine: API, bridge, simulator; senders as child processes.
pub struct Loop {
    pub app: TestApp,
    pub api: RunningApi,
    pub bridge: RunningBridge,
    pub sim_base: String,
    sim_token: CancellationToken,
}

impl Loop {
    /// Simulator config: 10% of messages end UNDELIVERED with 30006.
    pub const SOME_UNDELIVERED: &str = r#"
        [provider-sim]
        failures = [{ code = 30006, status = "undelivered", rate = 0.1 }]
        "#;

    /// `extra` config on top of short retry delays and quick simulator callbacks.
    pub async fn start(extra: &str) -> Loop {
        let (bridge_port, sim_port) = (free_port(), free_port());
        let mut doc: toml::Table = toml::from_str(&format!(
            r#"
            [bridge]
            public-url = "http://127.0.0.1:{bridge_port}"
            [provider]
            base-url = "http://127.0.0.1:{sim_port}"
            timeout = "1s"
            [sender]
            retry-delays = ["1s", "1s", "1s", "1s"]
            reconcile-after = "3s"
            pump-interval = "200ms"
            [provider-sim]
            seed = 7
            sent-after = "10ms"
            delivered-after = "50ms"
            jitter = "5ms"
            [campaigns]
            scheduler-interval = "200ms"
            "#
        ))
        .expect("loop config");
        let extra: toml::Table = toml::from_str(extra).expect("extra config");
        merge(&mut doc, extra);
        let app = TestApp::spawn_with(doc).await;
        let api = app.start_api().await;
        let bridge = app
            .start_bridge_on(&format!("127.0.0.1:{bridge_port}"))
            .await;
        let sim = ese::sim::Simulator::new(
            app.settings.provider_sim.clone(),
            SIM_ACCOUNT.to_string(),
            crate::fixtures::TOKEN.to_string(),
        )
        .expect("simulator");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", sim_port))
            .await
            .expect("bind simulator");
        let sim_token = CancellationToken::new();
        tokio::spawn(ese::sim::serve_on(sim, listener, sim_token.clone()));
        Loop {
            app,
            api,
            bridge,
            sim_base: format!("http://127.0.0.1:{sim_port}"),
            sim_token,
        }
    }

    /// Runs a scheduler tick and checks campaign `id` became COMPLETED.
    pub async fn assert_completes(&self, id: i64) {
        let commands = self.app.deps().commands().expect("commands producer");
        ese::campaigns::scheduler::tick(&self.app.pool, &commands)
            .await
            .expect("scheduler tick");
        let c = self
            .api
            .expect(200, "GET", &format!("/api/v1/campaigns/{id}"), None)
            .await;
        assert_eq!(c["status"], "COMPLETED");
    }

    /// `GET /sim/stats`.
    pub async fn stats(&self) -> serde_json::Value {
        self.bridge
            .http
            .get(format!("{}/sim/stats", self.sim_base))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json")
    }

    /// Scripts the next outcomes for `to` (`{"api_error": 20429}`, …).
    pub async fn script(&self, to: &str, outcomes: serde_json::Value) {
        let r = self
            .bridge
            .http
            .post(format!("{}/sim/script", self.sim_base))
            .json(&serde_json::json!({"to": to, "outcomes": outcomes}))
            .send()
            .await
            .expect("script");
        assert!(
            r.status().is_success(),
            "script refused: {}",
            r.text().await.unwrap_or_default()
        );
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.sim_token.cancel();
    }
}

/// The admin API running in the test process.
pub struct RunningApi {
    pub base: String,
    pub token: CancellationToken,
    pub http: reqwest::Client,
}

impl RunningApi {
    /// `METHOD path` with the admin token and an optional JSON body → (status, JSON or Null).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("api answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Like [`RunningApi::call`], expecting `status`; returns the JSON.
    pub async fn expect(
        &self,
        status: u16,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let (got, json) = self.call(method, path, body).await;
        assert_eq!(got, status, "{method} {path}: {json}");
        json
    }
}

impl Drop for RunningApi {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Records of `topics` not yet committed by `group` (None if it cannot tell yet).
pub async fn group_lag(settings: &Settings, group: &str, topics: &[String]) -> Option<i64> {
    let reader = ese::kafka::TopicReader::new(&settings.kafka).ok()?;
    let mut behind = 0;
    for topic in topics {
        for p in reader.group_offsets(group, topic).await.ok()? {
            behind += p.lag();
        }
    }
    Some(behind)
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
