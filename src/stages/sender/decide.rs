//! What to do with one message at send time: nothing, fail it, hold it
//! until a time, or send it now.

use chrono::{DateTime, NaiveTime, TimeZone, Utc};
use uuid::Uuid;

use super::Sender;
use crate::model::{CampaignStatus, Channel, ConsentState, MessageStatus, SendKind};

/// A message as the sender sees it.
pub(super) struct Msg {
    pub id: Uuid,
    pub status: MessageStatus,
    pub phone: String,
    pub channel: Channel,
    pub body: String,
    pub retries: i32,
    pub campaign: Option<Uuid>,
    pub campaign_status: Option<CampaignStatus>,
    pub rate: Option<i32>,
    pub quiet: Option<(NaiveTime, NaiveTime)>,
    pub consent: Option<ConsentState>,
    pub timezone: Option<String>,
    /// As stored on the row; the send record's own `kind` is not trusted.
    pub kind: SendKind,
    /// An approved template and its rendered numbered variables, in place of `body`.
    pub content: Option<(String, serde_json::Value)>,
    /// The person's last WhatsApp message (their window).
    pub last_whatsapp: Option<DateTime<Utc>>,
}

pub(super) enum Decision {
    Nothing,
    Fail(&'static str),
    Park(DateTime<Utc>, &'static str),
    Send,
}

impl Sender {
    /// `not_before`: the send record's retry delay (epoch ms).
    pub(super) fn decide(&self, m: &Msg, not_before: Option<i64>, now: DateTime<Utc>) -> Decision {
        if m.status != MessageStatus::Queued {
            return Decision::Nothing;
        }
        match (m.kind, m.consent) {
            (SendKind::OptOutConfirmation, _) => {}
            (_, Some(ConsentState::OptOut)) => {
                return Decision::Fail("suppressed: recipient opted out");
            }
            (SendKind::Campaign, c) if c != Some(ConsentState::OptIn) => {
                return Decision::Fail("suppressed: recipient has not opted in");
            }
            _ => {}
        }
        if m.channel == Channel::Whatsapp
            && m.content.is_none()
            && !self.window_open(m, now)
            && self.cfg.whatsapp_fallback_content_sid.is_empty()
        {
            return Decision::Fail(
                "outside the person's WhatsApp 24-hour window: a free-form message needs their message first, or sender.whatsapp-fallback-content-sid",
            );
        }
        match m.campaign_status {
            Some(CampaignStatus::Cancelled) => return Decision::Fail("campaign cancelled"),
            Some(CampaignStatus::Completed) => return Decision::Fail("campaign completed"),
            Some(CampaignStatus::Running) | None => {}
            // Paused (or not started): held until it runs.
            Some(_) => return Decision::Park(now, "campaign not running"),
        }
        if let Some(t) = not_before.and_then(DateTime::from_timestamp_millis)
            && t > now
        {
            return Decision::Park(t, "retry delay");
        }
        if let Some((start, end)) = m.quiet
            && let Some(until) = quiet_until(now, self.timezone(m), start, end)
        {
            return Decision::Park(until, "quiet hours");
        }
        Decision::Send
    }

    /// Whether free-form WhatsApp may go to `m`'s recipient now.
    fn window_open(&self, m: &Msg, now: DateTime<Utc>) -> bool {
        m.last_whatsapp.is_some_and(|t| {
            chrono::Duration::from_std(self.cfg.whatsapp_window).is_ok_and(|w| t + w > now)
        })
    }

    /// What the call sends: the message's approved template; on WhatsApp,
    /// its text inside the window, else the fallback template with the text
    /// as `{{1}}`; elsewhere its text.
    pub(super) fn payload<'a>(&'a self, m: &'a Msg) -> crate::twilio::client::Payload<'a> {
        use crate::twilio::client::Payload;
        if let Some((sid, vars)) = &m.content {
            return Payload::Content {
                sid,
                variables: vars.to_string(),
            };
        }
        if m.channel == Channel::Whatsapp
            && !self.window_open(m, Utc::now())
            && !self.cfg.whatsapp_fallback_content_sid.is_empty()
        {
            return Payload::Content {
                sid: &self.cfg.whatsapp_fallback_content_sid,
                variables: serde_json::json!({ "1": m.body }).to_string(),
            };
        }
        Payload::Body(&m.body)
    }

    /// The recipient's zone: attribute `timezone`, else the number's region, else the default.
    fn timezone(&self, m: &Msg) -> chrono_tz::Tz {
        m.timezone
            .as_deref()
            .and_then(|t| t.parse().ok())
            .or_else(|| {
                self.phones
                    .region(&m.phone)
                    .and_then(|r| region_zone(&r))
                    .and_then(|z| z.parse().ok())
            })
            .unwrap_or(self.default_tz)
    }
}

/// When the quiet window `[start, end)` (local time, may wrap midnight) that
/// `now` falls in ends, in UTC; `None` outside the window.
pub fn quiet_until(
    now: DateTime<Utc>,
    tz: chrono_tz::Tz,
    start: NaiveTime,
    end: NaiveTime,
) -> Option<DateTime<Utc>> {
    let local = now.with_timezone(&tz);
    let t = local.time();
    let inside = if start <= end {
        start <= t && t < end
    } else {
        t >= start || t < end
    };
    if !inside {
        return None;
    }
    let mut day = local.date_naive();
    if start > end && t >= start {
        day = day.succ_opt()?;
    }
    let end_local = day.and_time(end);
    let resolved = tz
        .from_local_datetime(&end_local)
        .earliest()
        // A gap (DST): an hour later always exists.
        .or_else(|| {
            tz.from_local_datetime(&(end_local + chrono::Duration::hours(1)))
                .earliest()
        })?;
    Some(resolved.with_timezone(&Utc))
}

/// The main time zone of a region, for numbers whose users gave none.
fn region_zone(region: &str) -> Option<&'static str> {
    Some(match region {
        "US" | "CA" => "America/New_York",
        "MX" => "America/Mexico_City",
        "BR" => "America/Sao_Paulo",
        "AR" => "America/Argentina/Buenos_Aires",
        "CO" => "America/Bogota",
        "GB" => "Europe/London",
        "IE" => "Europe/Dublin",
        "PT" => "Europe/Lisbon",
        "ES" => "Europe/Madrid",
        "FR" => "Europe/Paris",
        "DE" => "Europe/Berlin",
        "IT" => "Europe/Rome",
        "NL" => "Europe/Amsterdam",
        "BE" => "Europe/Brussels",
        "CH" => "Europe/Zurich",
        "AT" => "Europe/Vienna",
        "PL" => "Europe/Warsaw",
        "SE" => "Europe/Stockholm",
        "NO" => "Europe/Oslo",
        "DK" => "Europe/Copenhagen",
        "FI" => "Europe/Helsinki",
        "GR" => "Europe/Athens",
        "TR" => "Europe/Istanbul",
        "RU" => "Europe/Moscow",
        "ZA" => "Africa/Johannesburg",
        "NG" => "Africa/Lagos",
        "KE" => "Africa/Nairobi",
        "EG" => "Africa/Cairo",
        "AE" => "Asia/Dubai",
        "SA" => "Asia/Riyadh",
        "IL" => "Asia/Jerusalem",
        "IN" => "Asia/Kolkata",
        "PK" => "Asia/Karachi",
        "SG" => "Asia/Singapore",
        "MY" => "Asia/Kuala_Lumpur",
        "ID" => "Asia/Jakarta",
        "PH" => "Asia/Manila",
        "TH" => "Asia/Bangkok",
        "VN" => "Asia/Ho_Chi_Minh",
        "CN" => "Asia/Shanghai",
        "HK" => "Asia/Hong_Kong",
        "JP" => "Asia/Tokyo",
        "KR" => "Asia/Seoul",
        "AU" => "Australia/Sydney",
        "NZ" => "Pacific/Auckland",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_hours_wrap_midnight_in_local_time() {
        let tz: chrono_tz::Tz = "Europe/Paris".parse().unwrap();
        let start = NaiveTime::from_hms_opt(21, 0, 0).unwrap();
        let end = NaiveTime::from_hms_opt(8, 0, 0).unwrap();
        // 21:30 UTC in winter is 22:30 in Paris: quiet until 08:00 Paris = 07:00 UTC next day.
        let now = Utc.with_ymd_and_hms(2026, 1, 10, 21, 30, 0).unwrap();
        assert_eq!(
            quiet_until(now, tz, start, end),
            Some(Utc.with_ymd_and_hms(2026, 1, 11, 7, 0, 0).unwrap())
        );
        // 03:00 UTC = 04:00 Paris: same morning.
        let now = Utc.with_ymd_and_hms(2026, 1, 11, 3, 0, 0).unwrap();
        assert_eq!(
            quiet_until(now, tz, start, end),
            Some(Utc.with_ymd_and_hms(2026, 1, 11, 7, 0, 0).unwrap())
        );
        // Noon: not quiet.
        let now = Utc.with_ymd_and_hms(2026, 1, 11, 12, 0, 0).unwrap();
        assert_eq!(quiet_until(now, tz, start, end), None);
    }
}
