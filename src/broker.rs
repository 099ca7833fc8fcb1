//! The embedded Kafka-API broker (tansu), for development, tests and `ese up`
//! without `KAFKA_BROKERS`. Clients still talk to it over TCP through
//! rdkafka, exactly as they would to Apache Kafka.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

/// A broker running on a task of this process; [`EmbeddedBroker::stop`] stops
/// it cleanly, dropping it aborts it.
pub struct EmbeddedBroker {
    /// `host:port` for `bootstrap.servers`.
    pub bootstrap: String,
    task: JoinHandle<()>,
    /// Stops tansu's accept loop and its storage's request loop.
    cancel: CancellationToken,
}

impl EmbeddedBroker {
    /// Stops accepting connections and waits up to `patience` for the broker
    /// to finish: tansu serves each connection until its client closes it, so
    /// this is quick once this process's clients (stage consumers, which made
    /// their final commits, and the producer) are gone; what is left after
    /// `patience` is aborted. Aborting loses nothing acknowledged: a write is
    /// committed to the storage before it is answered.
    pub async fn stop(mut self, patience: Duration) {
        self.cancel.cancel();
        if tokio::time::timeout(patience, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!(
                ?patience,
                "embedded broker: clients still connected at stop; aborting"
            );
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.task.abort();
    }
}

/// Starts the broker listening on `listen` (`host:port`; port 0 picks a free
/// one) with `storage` (`memory://…`, `file:///DIR` or `sqlite://PATH`), and waits until it
/// accepts connections.
pub async fn start(listen: &str, storage: &str) -> anyhow::Result<EmbeddedBroker> {
    let mut addr: SocketAddr = listen
        .parse()
        .map_err(|e| anyhow::anyhow!("broker.listen {listen:?} is not host:port: {e}"))?;
    if addr.port() == 0 {
        let probe = std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("broker.listen {listen}: cannot bind: {e}"))?;
        addr = probe.local_addr()?;
    }
    if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
        anyhow::bail!("broker.listen {addr}: something already listens there");
    }
    let url = Url::parse(&format!("tcp://{addr}"))?;
    let storage_url =
        Url::parse(storage).map_err(|e| anyhow::anyhow!("broker.storage {storage:?}: {e}"))?;
    let cancel = CancellationToken::new();
    let task = spawn(url, storage_url, cancel.clone()).await?;
    let broker = EmbeddedBroker {
        bootstrap: addr.to_string(),
        task,
        cancel,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(broker);
        }
        if broker.task.is_finished() {
            anyhow::bail!("embedded broker on {addr} stopped at start (is the storage usable?)");
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("embedded broker on {addr} did not start listening within 20s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(feature = "embedded-broker")]
async fn spawn(
    url: Url,
    storage: Url,
    cancel: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    use tansu_broker::broker::Broker;
    use tansu_broker::coordinator::group::administrator::Controller;
    use tansu_storage::StorageContainer;

    let mut broker = Broker::<Controller<StorageContainer>, StorageContainer>::builder()
        .node_id(111)
        .cluster_id("ese")
        .incarnation_id(uuid::Uuid::now_v7())
        .advertised_listener(url.clone())
        .storage(storage.clone())
        .listener(url)
        .silent(true)
        .cancellation(cancel)
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("embedded broker (storage {storage}): {e}"))?;
    Ok(tokio::spawn(async move {
        if let Err(e) = broker.serve(tokio::time::Instant::now()).await {
            tracing::error!(error = %e, "embedded broker stopped");
        }
    }))
}

#[cfg(not(feature = "embedded-broker"))]
async fn spawn(_: Url, _: Url, _: CancellationToken) -> anyhow::Result<JoinHandle<()>> {
    anyhow::bail!("this ese was built without the embedded-broker feature; set KAFKA_BROKERS")
}

/// The `file://` storage's journal (vendor/tansu-storage, dynostore/journal.rs).
#[cfg(all(test, feature = "embedded-broker"))]
mod journal_tests {
    use std::fs::OpenOptions;
    use std::path::PathBuf;

    use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, path::Path};
    use tansu_storage::{JOURNAL_COMPACT_FLOOR as COMPACT_FLOOR, JOURNAL_FILE as FILE, Journal};

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("journal-test-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    async fn text(store: &Journal, path: &str) -> Option<String> {
        match store.get(&Path::from(path)).await {
            Ok(r) => Some(String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn what_was_answered_is_there_after_reopening() {
        let dir = scratch();
        {
            let store = Journal::open(&dir).await.unwrap();
            store.put(&Path::from("a/1"), "one".into()).await.unwrap();
            let v = store.put(&Path::from("a/2"), "two".into()).await.unwrap();
            store.put(&Path::from("gone"), "x".into()).await.unwrap();
            store.delete(&Path::from("gone")).await.unwrap();
            let opts = PutOptions {
                mode: PutMode::Update(v.into()),
                ..Default::default()
            };
            store
                .put_opts(&Path::from("a/2"), "two, updated".into(), opts.clone())
                .await
                .unwrap();
            // A stale version is refused and leaves nothing in the journal.
            let refused = store
                .put_opts(&Path::from("a/2"), "stale".into(), opts)
                .await;
            assert!(matches!(
                refused,
                Err(object_store::Error::Precondition { .. })
            ));
            let create = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            let refused = store
                .put_opts(&Path::from("a/1"), "again".into(), create)
                .await;
            assert!(matches!(
                refused,
                Err(object_store::Error::AlreadyExists { .. })
            ));
            // A second broker on the same folder is refused while this one runs.
            let second = Journal::open(&dir).await.err().unwrap().to_string();
            assert!(second.contains("in use by another process"), "{second}");
        }
        let store = Journal::open(&dir).await.unwrap();
        assert_eq!(text(&store, "a/1").await.as_deref(), Some("one"));
        assert_eq!(text(&store, "a/2").await.as_deref(), Some("two, updated"));
        assert_eq!(text(&store, "gone").await, None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_torn_tail_is_dropped_and_the_rest_kept() {
        let dir = scratch();
        {
            let store = Journal::open(&dir).await.unwrap();
            store.put(&Path::from("kept"), "yes".into()).await.unwrap();
            store.put(&Path::from("torn"), "no".into()).await.unwrap();
        }
        let path = dir.join(FILE);
        let len = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 3).unwrap();
        drop(file);
        {
            let store = Journal::open(&dir).await.unwrap();
            assert_eq!(text(&store, "kept").await.as_deref(), Some("yes"));
            assert_eq!(text(&store, "torn").await, None);
            // Writes after the cut land where the tail was.
            store.put(&Path::from("after"), "ok".into()).await.unwrap();
        }
        let store = Journal::open(&dir).await.unwrap();
        assert_eq!(text(&store, "after").await.as_deref(), Some("ok"));
        assert_eq!(text(&store, "kept").await.as_deref(), Some("yes"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Two writers overwrite and delete their objects while the journal is
    /// rewritten under them (it outgrows its bound several times): it stays
    /// bounded, and reopened it holds each object's last value.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journal_of_overwrites_is_rewritten_to_the_live_objects() {
        let dir = scratch();
        let rounds = 3 * (COMPACT_FLOOR >> 20) / 2;
        {
            let store = Journal::open(&dir).await.unwrap();
            let writers: Vec<_> = ["a", "b"]
                .into_iter()
                .map(|writer| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        for i in 0..rounds {
                            let mut value = vec![0u8; 1 << 20];
                            value[..8].copy_from_slice(&i.to_le_bytes());
                            let key = Path::from(format!("{writer}/{}", i % 4));
                            store.put(&key, value.into()).await.unwrap();
                            if i % 7 == 0 {
                                let gone = Path::from(format!("{writer}/gone"));
                                store.put(&gone, "x".into()).await.unwrap();
                                store.delete(&gone).await.unwrap();
                            }
                        }
                    })
                })
                .collect();
            for writer in writers {
                writer.await.unwrap();
            }
        }
        let len = std::fs::metadata(dir.join(FILE)).unwrap().len();
        assert!(
            len < 2 * 8 * (1 << 20) + COMPACT_FLOOR + (4 << 20),
            "journal of {len} bytes not rewritten"
        );
        let store = Journal::open(&dir).await.unwrap();
        for writer in ["a", "b"] {
            for k in 0..4 {
                let last = (0..rounds).filter(|i| i % 4 == k).max().unwrap();
                let back = store
                    .get(&Path::from(format!("{writer}/{k}")))
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap();
                assert_eq!(back.len(), 1 << 20);
                assert_eq!(back[..8], last.to_le_bytes(), "{writer}/{k}");
            }
            assert_eq!(text(&store, &format!("{writer}/gone")).await, None);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
