//! The account the engine acts as and the tokens it checks signatures
//! with, from the environment only.

/// The auth tokens from `TWILIO_AUTH_TOKEN` (comma-separated, current first:
/// during a rotation both verify signatures; the first signs calls).
pub fn tokens_from_env() -> Vec<String> {
    std::env::var("TWILIO_AUTH_TOKEN")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Provider credentials: `TWILIO_ACCOUNT_SID` and the first `TWILIO_AUTH_TOKEN`.
#[derive(Clone)]
pub struct Credentials {
    pub account_sid: String,
    pub auth_token: String,
}

impl Credentials {
    pub fn from_env() -> anyhow::Result<Self> {
        let account_sid = std::env::var("TWILIO_ACCOUNT_SID").unwrap_or_default();
        let auth_token = tokens_from_env().into_iter().next().unwrap_or_default();
        if account_sid.is_empty() || auth_token.is_empty() {
            anyhow::bail!("the sender needs TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN");
        }
        Ok(Self {
            account_sid,
            auth_token,
        })
    }
}
