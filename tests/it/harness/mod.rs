//! `TestApp`: a fresh database and fresh topic names per test, the real
//! config, and helpers that read like what a user would check. Beside it:
//! child processes and the services the project's scripts run
//! ([`processes`]), the HTTP surfaces in the test process ([`http`]), and
//! the whole loop on one machine ([`full_loop`]).

mod full_loop;
mod http;
mod processes;

pub use full_loop::Loop;
pub use http::{RunningApi, RunningBridge};
pub use processes::*;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use ese::codec::Codec;
use ese::config::Settings;
use ese::runner::Deps;
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
pub fn admin_url() -> String {
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
        // This process's metrics, as `metrics.listen` would serve them.
        ese::metrics::handle();
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
            pipelines.insert(name.clone(), t.into());
        }
        let mut topics = toml::Table::new();
        for (key, name) in &defaults.topics {
            topics.insert(key.clone(), format!("{prefix}.{name}").into());
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
            produce-timeout = "3s"
            "#,
            brokers(),
            crate::fixtures::PUBLIC_URL,
        ))
        .expect("test config");
        doc.insert("pipelines".into(), pipelines.into());
        doc.insert("topics".into(), topics.into());
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
        ese::kafka::ensure_topics(&settings.kafka, &settings.topic_retention())
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
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind bridge");
        self.start_bridge_listening(listener)
    }

    /// Starts the webhook bridge on a bound `listener` (bound first, so no
    /// other process can take its port between choosing and binding it).
    pub fn start_bridge_listening(&self, listener: tokio::net::TcpListener) -> RunningBridge {
        let bridge = ese::bridge::Bridge::new(
            &self.settings,
            vec![crate::fixtures::TOKEN.to_string()],
            self.pool.clone(),
        )
        .expect("bridge");
        let addr = listener.local_addr().expect("bridge address");
        let token = CancellationToken::new();
        let t = token.clone();
        let router = bridge.router();
        let limits = ese::bridge::Limits::of(&self.settings.bridge);
        tokio::spawn(async move { ese::bridge::serve_on(listener, router, limits, t).await });
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
            ese::campaigns::Commands::new(&deps).expect("commands"),
            Some(ADMIN_TOKEN.to_string()),
            self.settings.campaigns.max_filter_depth,
        )
        .expect("admin API");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind api");
        let addr = listener.local_addr().expect("api address");
        let token = CancellationToken::new();
        let t = token.clone();
        let router = admin.router();
        let limits = ese::bridge::Limits::of(&self.settings.bridge);
        tokio::spawn(async move { ese::bridge::serve_on(listener, router, limits, t).await });
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
                "INSERT INTO users (phone_e164, attributes)
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
            let key = match table {
                "fanout_progress" => "campaign_id",
                "users" => "phone_e164",
                _ => "id",
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

pub const ADMIN_TOKEN: &str = "test-admin-token";

/// The account the provider simulator accepts in tests.
pub const SIM_ACCOUNT: &str = "ACtest0000000000000000000000000000";

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

/// Keeps a failing external checker's whole report in
/// `target/tmp/reports/NAME.txt`, which `scripts/test` prints after a failed
/// pass, so the end of a cut CI log still shows what was found.
pub fn keep_report(name: &str, text: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("reports");
    let path = dir.join(format!("{name}.txt"));
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text)) {
        eprintln!("cannot keep the {name} report in {}: {e}", path.display());
    }
}

/// An empty database of its own (no migration applied), dropped with the
/// value: for tests that migrate by steps.
pub struct EmptyDb {
    pub url: String,
    name: String,
}

impl EmptyDb {
    pub async fn create() -> EmptyDb {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("ese_test_{}", &id[..16]);
        connect(&admin_url())
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let mut url = url::Url::parse(&admin_url()).expect("DATABASE_URL parses");
        url.set_path(&format!("/{name}"));
        EmptyDb {
            url: url.to_string(),
            name,
        }
    }
}

impl Drop for EmptyDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Runtime::new() {
                rt.block_on(async move {
                    if let Ok((c, conn)) =
                        tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await
                    {
                        tokio::spawn(conn);
                        let _ = c
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

/// The `id` of a resource the admin API answered with: a UUID.
pub fn id_of(resource: &serde_json::Value) -> uuid::Uuid {
    resource["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no UUID id in {resource}"))
}
