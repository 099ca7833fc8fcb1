//! The bridge and the admin API running in the test process, called over
//! real sockets.

use tokio_util::sync::CancellationToken;

use super::ADMIN_TOKEN;

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
