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
