//! `[consent]`: the keywords people write and the replies they get.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Consent keywords and auto-replies. A keyword matches the whole message
/// as people write it (width, case, quotes, emoji, zero-width characters,
/// hyphens ignored: `stages::consent::normalise`), or with only filler words
/// around it in a short message ("please stop", "stop texting me").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConsentConfig {
    /// Default the FCC's list (STOP, QUIT, END, REVOKE, OPT OUT, CANCEL,
    /// UNSUBSCRIBE) plus STOPALL, STOP ALL, OPTOUT.
    pub opt_out_keywords: Vec<String>,
    /// Default START, YES, UNSTOP.
    pub opt_in_keywords: Vec<String>,
    /// Default HELP, INFO.
    pub help_keywords: Vec<String>,
    /// Words that may surround a keyword in a plain request ("please",
    /// "me", "texting"…).
    #[serde(default)]
    pub filler_words: Vec<String>,
    /// A message of more words than this is never a plain request, even if
    /// all but the keyword are fillers. Default 6.
    #[serde(default = "default_max_plain_words")]
    pub max_plain_words: usize,
    /// Sent once after an opt-out (the one message an opted-out number gets); empty: none.
    pub opt_out_reply: String,
    /// Sent after an opt-in; empty: none.
    pub opt_in_reply: String,
    /// Sent after HELP to any number not opted out; empty: none.
    pub help_reply: String,
    /// Answer a message that mentions an opt-out keyword without plainly
    /// revoking ("can I cancel my order?", kept as `UNCLEAR`) with
    /// `clarify-reply`, at most once per number per `clarify-interval`, and
    /// never to an opted-out number. Default true.
    pub clarify: bool,
    /// Default "If you want no more messages from us, reply STOP."
    pub clarify_reply: String,
    /// Default 24h.
    #[serde(with = "humantime_serde")]
    pub clarify_interval: Duration,
    /// Operator rules: a keyword and its reply (numbers not opted out).
    #[serde(default)]
    pub rules: Vec<ReplyRule>,
    /// What a STOP stops: `all` (default: every channel; the person's
    /// overall `users.consent_state`) or `channel` (the channel it came on,
    /// which then keeps its own consent, `user_channels.consent_state`;
    /// START works the same way). Provider opt-outs (21610) follow it too.
    #[serde(default)]
    pub stop_scope: StopScope,
}

/// `consent.stop-scope`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopScope {
    #[default]
    All,
    Channel,
}

fn default_max_plain_words() -> usize {
    6
}

/// `[[consent.rules]] keyword = "HOURS" reply = "We are open 9-5."`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReplyRule {
    pub keyword: String,
    pub reply: String,
}
