//! The embedded Kafka-API broker (tansu), for development, tests and `ese up`
//! without `KAFKA_BROKERS`. Clients still talk to it over TCP through
//! rdkafka, exactly as they would to Apache Kafka.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinHandle;
use url::Url;

/// A broker running on a task of this process; stopped when dropped.
pub struct EmbeddedBroker {
    /// `host:port` for `bootstrap.servers`.
    pub bootstrap: String,
    task: JoinHandle<()>,
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the broker listening on `listen` (`host:port`; port 0 picks a free
/// one) with `storage` (`memory://…` or `sqlite://PATH`), and waits until it
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
    let task = spawn(url, storage_url).await?;
    let broker = EmbeddedBroker {
        bootstrap: addr.to_string(),
        task,
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
async fn spawn(url: Url, storage: Url) -> anyhow::Result<JoinHandle<()>> {
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
async fn spawn(_: Url, _: Url) -> anyhow::Result<JoinHandle<()>> {
    anyhow::bail!("this ese was built without the embedded-broker feature; set KAFKA_BROKERS")
}
