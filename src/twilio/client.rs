//! The provider's Messages API as the sender uses it: send, and look a
//! message up (reconciliation), each answer classified.

use std::time::Instant;

use chrono::{DateTime, Utc};
use metrics::histogram;

use super::credentials::Credentials;
use super::errors::Class;
use crate::config::ProviderConfig;
use crate::model::Channel;

/// The provider's Messages API.
#[derive(Clone)]
pub struct Provider {
    pub http: reqwest::Client,
    pub cfg: ProviderConfig,
    pub creds: Credentials,
    /// `bridge.public-url` + `/webhooks/twilio/status`.
    pub status_callback: String,
}

/// What a message sends: its text, or an approved template (Content API)
/// with its numbered variables (a JSON object, `{"1": "Ada"}`).
#[derive(Debug, Clone, PartialEq)]
pub enum Payload<'a> {
    Body(&'a str),
    Content { sid: &'a str, variables: String },
}

/// What one provider call came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Sent(String),
    Transient(Option<i32>, String),
    Permanent(Option<i32>, String),
    /// No answer: the provider may or may not have the message.
    Unknown(String),
}

/// What an API answer means, by the error table ([`super::errors`]).
pub fn classify(code: Option<i32>, http_status: u16, message: String) -> Outcome {
    match super::errors::class_of(code, http_status) {
        Class::Transient => Outcome::Transient(code, message),
        Class::Permanent | Class::OptedOut | Class::NotOnChannel | Class::Request => {
            Outcome::Permanent(code, message)
        }
    }
}

impl Provider {
    fn url(&self, tail: &str) -> String {
        format!(
            "{}/{}/Accounts/{}/{tail}",
            self.cfg.base_url.trim_end_matches('/'),
            super::API_VERSION,
            self.creds.account_sid
        )
    }

    fn address(channel: Channel, number: &str) -> String {
        if channel == Channel::Whatsapp {
            format!("whatsapp:{number}")
        } else {
            number.to_string()
        }
    }

    /// `POST …/Messages.json`.
    pub async fn send(&self, channel: Channel, to: &str, payload: &Payload<'_>) -> Outcome {
        let mut form = vec![
            ("To", Self::address(channel, to)),
            ("StatusCallback", self.status_callback.clone()),
        ];
        match payload {
            Payload::Body(body) => form.push(("Body", body.to_string())),
            Payload::Content { sid, variables } => {
                form.push(("ContentSid", sid.to_string()));
                form.push(("ContentVariables", variables.clone()));
            }
        }
        if self.cfg.messaging_service_sid.is_empty() {
            form.push(("From", Self::address(channel, &self.cfg.from)));
        } else {
            form.push((
                "MessagingServiceSid",
                self.cfg.messaging_service_sid.clone(),
            ));
        }
        let started = Instant::now();
        let result = self
            .http
            .post(self.url("Messages.json"))
            .basic_auth(&self.creds.account_sid, Some(&self.creds.auth_token))
            .form(&form)
            .timeout(self.cfg.timeout)
            .send()
            .await;
        histogram!(crate::metrics::names::SENDER_PROVIDER_SECONDS)
            .record(started.elapsed().as_secs_f64());
        let resp = match result {
            // The request never reached the provider: safe to try again.
            Err(e) if e.is_connect() => return Outcome::Transient(None, format!("connect: {e}")),
            Err(e) => return Outcome::Unknown(format!("no answer: {e}")),
            Ok(r) => r,
        };
        let status = resp.status().as_u16();
        let json: serde_json::Value = match resp.json().await {
            Ok(j) => j,
            Err(e) if status < 300 => return Outcome::Unknown(format!("unreadable answer: {e}")),
            Err(_) => serde_json::Value::Null,
        };
        if (200..300).contains(&status) {
            return match json.get("sid").and_then(|s| s.as_str()) {
                Some(sid) => Outcome::Sent(sid.to_string()),
                None => Outcome::Unknown(format!("answer {status} without a sid")),
            };
        }
        let code = json.get("code").and_then(|c| c.as_i64()).map(|c| c as i32);
        let message = json
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_string();
        classify(code, status, format!("HTTP {status}: {message}"))
    }

    /// The SIDs of the messages to `to` created since `since` whose text is
    /// `body` (`None`: a template send, whose text the provider renders from
    /// its own copy: any text), newest first. More than one when the person
    /// got the same text twice (two opt-out confirmations): the caller tells
    /// them apart by the SIDs it already holds.
    pub async fn find(
        &self,
        channel: Channel,
        to: &str,
        body: Option<&str>,
        since: DateTime<Utc>,
    ) -> anyhow::Result<Vec<String>> {
        let url = url::Url::parse_with_params(
            &self.url("Messages.json"),
            &[
                ("To", Self::address(channel, to).as_str()),
                ("PageSize", "100"),
            ],
        )?;
        let resp = self
            .http
            .get(url)
            .basic_auth(&self.creds.account_sid, Some(&self.creds.auth_token))
            .timeout(self.cfg.timeout)
            .send()
            .await?
            .error_for_status()?;
        let json: serde_json::Value = resp.json().await?;
        let since = since - chrono::Duration::minutes(1);
        let found = json
            .get("messages")
            .and_then(|m| m.as_array())
            .into_iter()
            .flatten()
            .filter(|m| {
                let created = m
                    .get("date_created")
                    .and_then(|d| d.as_str())
                    .and_then(|d| DateTime::parse_from_rfc2822(d).ok());
                (body.is_none() || m.get("body").and_then(|b| b.as_str()) == body)
                    && created.is_some_and(|c| c >= since)
            })
            .filter_map(|m| m.get("sid").and_then(|s| s.as_str()).map(str::to_string))
            .collect();
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_provider_errors() {
        let t = |c, s| matches!(classify(Some(c), s, String::new()), Outcome::Transient(..));
        for code in [20429, 30001, 30003, 30008] {
            assert!(t(code, 400), "{code}");
        }
        for code in [21211, 21408, 21610, 21614, 30004, 30005, 30006, 30007] {
            assert!(!t(code, 400), "{code}");
        }
        assert!(matches!(
            classify(None, 503, String::new()),
            Outcome::Transient(..)
        ));
        assert!(matches!(
            classify(Some(12345), 400, String::new()),
            Outcome::Permanent(..)
        ));
    }
}
