//! The domain's states, one enum each. PostgreSQL keeps them as text (the
//! data model's `VARCHAR` columns, held to these values by CHECK
//! constraints) and Avro records as strings; here they are types, so a typo
//! is a compile error and a state machine is a `match`.

use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

/// A value that is not one of an enum's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a {kind} (one of {allowed})")]
pub struct UnknownValue {
    pub kind: &'static str,
    pub value: String,
    pub allowed: String,
}

/// An enum whose values are stored as text: `as_str`, `FromStr`, `Display`,
/// serde as its text, and `ToSql`/`FromSql` for `TEXT`/`VARCHAR` columns.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored text.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                self.as_str() == other
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownValue {
                        kind: stringify!($name),
                        value: other.to_string(),
                        allowed: [$($text),+].join(", "),
                    }),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl ToSql for $name {
            fn to_sql(
                &self,
                ty: &Type,
                out: &mut bytes::BytesMut,
            ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
                self.as_str().to_sql(ty, out)
            }

            fn accepts(ty: &Type) -> bool {
                <&str as ToSql>::accepts(ty)
            }

            to_sql_checked!();
        }

        impl<'a> FromSql<'a> for $name {
            fn from_sql(
                ty: &Type,
                raw: &'a [u8],
            ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
                Ok(<&str as FromSql>::from_sql(ty, raw)?.parse()?)
            }

            fn accepts(ty: &Type) -> bool {
                <&str as FromSql>::accepts(ty)
            }
        }
    };
}

text_enum!(
    /// Where a message is in its life: QUEUED → SENDING → SENT → DELIVERED
    /// (→ READ), or FAILED / UNDELIVERED.
    MessageStatus {
        Queued = "QUEUED",
        Sending = "SENDING",
        Sent = "SENT",
        Delivered = "DELIVERED",
        Read = "READ",
        Undelivered = "UNDELIVERED",
        Failed = "FAILED",
    }
);

impl MessageStatus {
    /// After these nothing more happens to a message.
    pub const FINAL: &'static [MessageStatus] = &[
        MessageStatus::Delivered,
        MessageStatus::Read,
        MessageStatus::Undelivered,
        MessageStatus::Failed,
    ];

    pub fn is_final(self) -> bool {
        Self::FINAL.contains(&self)
    }
}

text_enum!(
    /// A campaign's state (see [`CampaignStatus::next`]).
    CampaignStatus {
        Draft = "DRAFT",
        Ready = "READY",
        Running = "RUNNING",
        Paused = "PAUSED",
        Completed = "COMPLETED",
        Cancelled = "CANCELLED",
    }
);

text_enum!(
    /// What an operator (or the scheduler) asks of a campaign.
    CampaignAction {
        Ready = "ready",
        Start = "start",
        Pause = "pause",
        Resume = "resume",
        Cancel = "cancel",
        /// The scheduler's own, once the fan-out finished and every message is final.
        Complete = "complete",
    }
);

impl CampaignAction {
    /// The actions of `POST /api/v1/campaigns/{id}/{action}`.
    pub const OPERATOR: &'static [CampaignAction] = &[
        CampaignAction::Ready,
        CampaignAction::Start,
        CampaignAction::Pause,
        CampaignAction::Resume,
        CampaignAction::Cancel,
    ];
}

/// The campaign state machine (the data model's): DRAFT → READY → RUNNING →
/// COMPLETED; DRAFT, READY and RUNNING may be PAUSED (resume returns to where
/// it was); anything not final may be CANCELLED; COMPLETED and CANCELLED are
/// final. COMPLETED is reached only by the scheduler.
impl CampaignStatus {
    /// Statuses a campaign can no longer leave.
    pub const FINAL: &'static [CampaignStatus] =
        &[CampaignStatus::Completed, CampaignStatus::Cancelled];

    /// Statuses in which a campaign holds on to its template and segment.
    pub const ACTIVE: &'static [CampaignStatus] = &[
        CampaignStatus::Ready,
        CampaignStatus::Running,
        CampaignStatus::Paused,
    ];

    /// The operator actions allowed from here.
    pub fn allowed(self) -> &'static [CampaignAction] {
        use CampaignAction::*;
        match self {
            CampaignStatus::Draft => &[Ready, Pause, Cancel],
            CampaignStatus::Ready => &[Start, Pause, Cancel],
            CampaignStatus::Running => &[Pause, Cancel],
            CampaignStatus::Paused => &[Resume, Cancel],
            CampaignStatus::Completed | CampaignStatus::Cancelled => &[],
        }
    }

    /// Where `action` leads from here (`paused_from`: where a paused
    /// campaign resumes to), or `None` when it is not allowed.
    pub fn next(
        self,
        paused_from: Option<CampaignStatus>,
        action: CampaignAction,
    ) -> Option<CampaignStatus> {
        use CampaignAction as A;
        use CampaignStatus as S;
        if action == A::Complete {
            return (self == S::Running).then_some(S::Completed);
        }
        if !self.allowed().contains(&action) {
            return None;
        }
        Some(match action {
            A::Ready => S::Ready,
            A::Start => S::Running,
            A::Pause => S::Paused,
            A::Resume => match paused_from {
                Some(S::Draft) => S::Draft,
                Some(S::Ready) => S::Ready,
                _ => S::Running,
            },
            A::Cancel | A::Complete => S::Cancelled,
        })
    }
}

text_enum!(
    /// A person's consent, and what a consent event decided.
    ConsentState {
        OptIn = "OPT_IN",
        OptOut = "OPT_OUT",
        /// First seen through an inbound message: no campaign until an opt-in.
        Unknown = "UNKNOWN",
        /// Only in `consent_events`: a message that mentions a keyword
        /// without plainly revoking; decides nothing.
        Unclear = "UNCLEAR",
    }
);

text_enum!(
    /// Why a message is sent (`messages.kind`, set when the row is made):
    /// decides whom it may go to. A campaign message only to an opted-in
    /// number; a reply or clarification to anyone not opted out; an opt-out
    /// confirmation is the one message an opted-out number gets.
    SendKind {
        Campaign = "campaign",
        /// An auto-reply (HELP, opt-in confirmation, an operator rule).
        Reply = "reply",
        /// The one message an opted-out number may still get.
        OptOutConfirmation = "opt_out_confirmation",
        /// "Reply STOP to unsubscribe", after a message that mentioned a
        /// keyword without plainly revoking.
        Clarification = "clarification",
    }
);

text_enum!(
    /// The channel a message travels on.
    Channel {
        Sms = "SMS",
        Whatsapp = "WHATSAPP",
    }
);

text_enum!(
    /// What became of an inbound message in the consent stage.
    InboundStatus {
        Pending = "PENDING",
        Processed = "PROCESSED",
        Failed = "FAILED",
        Invalid = "INVALID",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn campaign_state_machine() {
        use CampaignAction as A;
        use CampaignStatus as S;
        assert_eq!(S::Draft.next(None, A::Ready), Some(S::Ready));
        assert_eq!(S::Ready.next(None, A::Start), Some(S::Running));
        assert_eq!(S::Running.next(None, A::Start), None);
        assert_eq!(S::Paused.next(Some(S::Ready), A::Resume), Some(S::Ready));
        assert_eq!(S::Paused.next(None, A::Resume), Some(S::Running));
        assert_eq!(S::Running.next(None, A::Complete), Some(S::Completed));
        assert_eq!(S::Ready.next(None, A::Complete), None);
        for s in S::FINAL {
            assert!(s.allowed().is_empty());
        }
    }

    #[test]
    fn text_round_trips_and_unknown_values_are_named() {
        for s in MessageStatus::ALL {
            assert_eq!(s.as_str().parse::<MessageStatus>(), Ok(*s));
        }
        let err = "SHIPPED".parse::<MessageStatus>().unwrap_err().to_string();
        assert!(err.contains("SHIPPED") && err.contains("QUEUED"), "{err}");
        let json = serde_json::to_string(&SendKind::OptOutConfirmation).unwrap();
        assert_eq!(json, "\"opt_out_confirmation\"");
        assert!(serde_json::from_str::<Channel>("\"FAX\"").is_err());
    }
}
