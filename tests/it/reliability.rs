//! The reliability suite: failures injected under load, each scenario ending
//! with the same checks ([`assert_nothing_lost`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;

use crate::harness::{Loop, Proc};

/// Campaign recipients (all opted in, no quiet hours).
const RECIPIENTS: i64 = 300;
/// People texting STOP, START, STOP while the campaign runs.
const TEXTERS: usize = 40;
const KEYWORDS: [&str; 3] = ["STOP", "START", "STOP"];

fn texter(i: usize) -> String {
    format!("+1415300{i:04}")
}

/// Posts each texter's keywords through the bridge, signed as the provider
/// does; returns how many were answered 2xx.
async fn text_in(l: &Loop) -> usize {
    let url = format!(
        "{}/webhooks/twilio/inbound",
        l.app.settings.bridge.public_url
    );
    let mut accepted = 0;
    for keyword in KEYWORDS {
        for i in 0..TEXTERS {
            let params: Vec<(String, String)> = [
                ("MessageSid", format!("SM{}", uuid::Uuid::new_v4().simple())),
                ("AccountSid", crate::harness::SIM_ACCOUNT.to_string()),
                ("From", texter(i)),
                ("To", "+15005550006".to_string()),
                ("Body", keyword.to_string()),
                ("NumMedia", "0".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let signature = ese::bridge::signature::sign(crate::fixtures::TOKEN, &url, &params);
            let body = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&params)
                .finish();
            let r = l
                .bridge
                .post_form("/webhooks/twilio/inbound", body, Some(&signature))
                .await;
            if r.status().is_success() {
                accepted += 1;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    accepted
}

/// Polls `sql` (one bigint) until it equals `want`; returns the last value.
async fn settle(l: &Loop, sql: &str, want: i64, timeout: Duration) -> i64 {
    let deadline = Instant::now() + timeout;
    loop {
        let n = l.app.count(sql).await;
        if n == want || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The checks every scenario ends with: every webhook answered 2xx is in
/// Postgres exactly once; every message reached the simulator at most once,
/// and each campaign recipient exactly once; nobody opted out was sent a
/// campaign message after opting out; the consent history is complete.
async fn assert_nothing_lost(l: &Loop, campaign: i64, inbound_accepted: usize) {
    let final_sql = format!(
        "SELECT count(*) FROM messages WHERE campaign_id = {campaign}
            AND status IN ('DELIVERED', 'UNDELIVERED', 'FAILED')"
    );
    let finals = settle(l, &final_sql, RECIPIENTS, Duration::from_secs(120)).await;
    assert_eq!(finals, RECIPIENTS, "campaign messages in a final state");

    // Inbound: one audit row each, and the whole consent history.
    let inbound = settle(
        l,
        "SELECT count(*) FROM inbound_events",
        inbound_accepted as i64,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        inbound, inbound_accepted as i64,
        "inbound webhooks answered 2xx vs rows"
    );
    let history = settle(
        l,
        "SELECT count(*) FROM consent_events WHERE source = 'keyword'",
        (TEXTERS * KEYWORDS.len()) as i64,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        history,
        (TEXTERS * KEYWORDS.len()) as i64,
        "consent decisions recorded"
    );
    let opted_out = l
        .app
        .count("SELECT count(*) FROM users WHERE phone_number LIKE '+1415300%' AND consent_state = 'OPT_OUT'")
        .await;
    assert_eq!(opted_out, TEXTERS as i64, "every texter ends opted out");

    // Status callbacks: once the simulator is done, one receipt per callback
    // the bridge answered 2xx.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (callbacks, receipts) = loop {
        let stats = l.stats().await;
        let callbacks = stats["callbacks"]["sent"].as_i64().unwrap_or(-1);
        let receipts = l.app.count("SELECT count(*) FROM delivery_receipts").await;
        if callbacks == receipts || Instant::now() > deadline {
            break (callbacks, receipts);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(
        receipts, callbacks,
        "status callbacks answered 2xx vs receipt rows"
    );
    let unique = l
        .app
        .count("SELECT count(DISTINCT event_id) FROM delivery_receipts")
        .await;
    assert_eq!(unique, receipts, "no receipt stored twice");

    // Sends: the simulator's count per recipient is exactly the messages sent to it.
    let stats = l.stats().await;
    let seen: BTreeMap<String, i64> =
        serde_json::from_value(stats["per_recipient"].clone()).expect("per_recipient");
    let c = l.app.pool.get().await.expect("db");
    let sent: BTreeMap<String, i64> = c
        .query(
            "SELECT recipient_phone, count(*) FROM messages WHERE provider_sid IS NOT NULL GROUP BY 1",
            &[],
        )
        .await
        .expect("sent per recipient")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(seen, sent, "simulator sends per recipient vs messages sent");
    let once = c
        .query_one(
            "SELECT count(*) FROM messages WHERE campaign_id = $1 AND provider_sid IS NOT NULL",
            &[&campaign],
        )
        .await
        .expect("campaign sends")
        .get::<_, i64>(0);
    assert_eq!(
        once, RECIPIENTS,
        "each campaign recipient sent exactly once"
    );
    let after_opt_out = l
        .app
        .count(
            "SELECT count(*) FROM messages m JOIN users u ON u.phone_number = m.recipient_phone
              WHERE m.campaign_id IS NOT NULL AND u.consent_state = 'OPT_OUT'
                AND m.sent_at > u.consent_updated_at",
        )
        .await;
    assert_eq!(after_opt_out, 0, "campaign messages sent after an opt-out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_processes_killed_at_random_under_load_lose_nothing() {
    let l = Loop::start(Loop::SOME_UNDELIVERED).await;
    l.app
        .seed_users(
            RECIPIENTS,
            "jsonb_build_object('plan', 'pro', 'first_name', 'U' || i)",
        )
        .await;
    let webhooks = ["run", "normalize", "receipts", "consent"];
    let sends = ["run", "fanout", "sender"];
    let mut a = Proc::new(l.app.spawn_ese(&webhooks));
    let mut b = Proc::new(l.app.spawn_ese(&sends));
    // Let both join their groups before the load starts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let campaign =
        crate::sender::start_campaign(&l, "reliable", json!({"rate_limit_per_second": 100})).await;

    let kills = async {
        for round in 0..4 {
            let wait = rand::rng().random_range(300..1200);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if round % 2 == 0 {
                a.kill9();
                a = Proc::new(l.app.spawn_ese(&webhooks));
            } else {
                b.kill9();
                b = Proc::new(l.app.spawn_ese(&sends));
            }
        }
    };
    let (accepted, ()) = tokio::join!(text_in(&l), kills);
    assert_eq!(accepted, TEXTERS * KEYWORDS.len(), "the bridge stayed up");
    assert_nothing_lost(&l, campaign, accepted).await;
    l.assert_completes(campaign).await;
    drop((a, b));
}
