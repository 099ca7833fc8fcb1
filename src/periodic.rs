//! The one loop every piece of background work runs in: a pass now, then
//! every `interval` (or sooner when woken), until shutdown; a failed pass is
//! counted, logged and tried again next time.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// A piece of background work.
pub struct Task {
    /// For logs.
    pub name: &'static str,
    /// The counter of its failed passes (`ese_<area>_errors_total`).
    pub errors: &'static str,
    pub interval: Duration,
    /// Runs a pass before the interval is up when notified.
    pub wake: Option<Arc<Notify>>,
}

impl Task {
    /// A task that runs every `interval`.
    pub fn every(name: &'static str, errors: &'static str, interval: Duration) -> Self {
        Self {
            name,
            errors,
            interval,
            wake: None,
        }
    }

    /// Also runs when `wake` is notified.
    pub fn woken_by(mut self, wake: Arc<Notify>) -> Self {
        self.wake = Some(wake);
        self
    }

    /// Runs `pass` until `shutdown`.
    pub async fn run<F, Fut>(self, shutdown: CancellationToken, mut pass: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        loop {
            if let Err(e) = pass().await {
                metrics::counter!(self.errors).increment(1);
                warn!(task = self.name, error = %e, "background pass failed; trying again");
            }
            let woken = async {
                match &self.wake {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = woken => {}
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}
