//! The whole loop on one machine: admin API, bridge and simulator in the
//! test process; stages as child processes.

use tokio_util::sync::CancellationToken;

use super::{RunningApi, RunningBridge, SIM_ACCOUNT, TestApp, merge};

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
        // Both listeners bound before the config names their ports: a port
        // chosen and released first can be taken in between (it was, by
        // another test, under Apache Kafka's pass).
        let bind = || async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a local port");
            let port = l.local_addr().expect("local address").port();
            (l, port)
        };
        let ((bridge_listener, bridge_port), (sim_listener, sim_port)) =
            (bind().await, bind().await);
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
        let bridge = app.start_bridge_listening(bridge_listener);
        let sim = ese::sim::Simulator::new(
            app.settings.provider_sim.clone(),
            SIM_ACCOUNT.to_string(),
            crate::fixtures::TOKEN.to_string(),
        )
        .expect("simulator");
        let sim_token = CancellationToken::new();
        tokio::spawn(ese::sim::serve_on(sim, sim_listener, sim_token.clone()));
        Loop {
            app,
            api,
            bridge,
            sim_base: format!("http://127.0.0.1:{sim_port}"),
            sim_token,
        }
    }

    /// Runs a scheduler tick and checks campaign `id` became COMPLETED.
    pub async fn assert_completes(&self, id: uuid::Uuid) {
        let commands = ese::campaigns::Commands::new(&self.app.deps()).expect("commands producer");
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
            .basic_auth(crate::harness::SIM_ACCOUNT, Some(crate::fixtures::TOKEN))
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
            .basic_auth(crate::harness::SIM_ACCOUNT, Some(crate::fixtures::TOKEN))
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
