//! The full loop against the provider simulator: campaign → fan-out → sender
//! (child processes) → simulator → signed callbacks → bridge → normalize →
//! receipts → DELIVERED. Counts come from the simulator's own stats.

use std::collections::BTreeMap;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Loop, Proc, RunningStage, kill9};

/// Creates template, segment (everyone with `plan = pro`) and a campaign with
/// `options`, readies and starts it; returns its id.
pub(crate) async fn start_campaign(l: &Loop, name: &str, options: Value) -> uuid::Uuid {
    let api = &l.api;
    let t = api
        .expect(
            201,
            "POST",
            "/api/v1/templates",
            Some(json!({"name": name, "content": "Hi {first_name}"})),
        )
        .await;
    let s = api
        .expect(
            201,
            "POST",
            "/api/v1/segments",
            Some(json!({"name": name, "filter_criteria": {"attribute": "plan", "operator": "equals", "value": "pro"}})),
        )
        .await;
    // At any hour, at the old default rate unless the test says otherwise.
    let mut body = json!({"name": name, "template_id": t["id"], "segment_id": s["id"],
                          "rate_limit_per_second": 10,
                          "quiet_hours_start": null, "quiet_hours_end": null});
    for (k, v) in options.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    let c = api
        .expect(201, "POST", "/api/v1/campaigns", Some(body))
        .await;
    let id = crate::harness::id_of(&c);
    // Without a schedule_time, ready starts it at once.
    api.expect(200, "POST", &format!("/api/v1/campaigns/{id}/ready"), None)
        .await;
    id
}

/// `n` opted-in users ([`phone`]`(i)`) with `plan = pro`, a first name and `timezone`.
async fn users(l: &Loop, n: i64, timezone: &str) {
    l.app
        .seed_users(
            n,
            &format!("jsonb_build_object('plan', 'pro', 'first_name', 'U' || i, 'timezone', '{timezone}')"),
        )
        .await;
}

fn phone(i: i64) -> String {
    format!("+1415{}", 2_000_000 + i)
}

struct Stages(Vec<RunningStage>, Vec<Child>);

impl Drop for Stages {
    fn drop(&mut self) {
        for c in &mut self.1 {
            kill9(c);
        }
    }
}

impl Stages {
    /// In-process fanout, normalize, receipts; `senders` sender child processes.
    fn start(l: &Loop, senders: usize) -> Stages {
        let stages = ["fanout", "normalize", "receipts"]
            .into_iter()
            .map(|s| l.app.start_stage(s))
            .collect();
        let children = (0..senders)
            .map(|_| l.app.spawn_ese(&["run", "sender"]))
            .collect();
        Stages(stages, children)
    }

    async fn stop(mut self) {
        for c in &mut self.1 {
            kill9(c);
        }
        for s in std::mem::take(&mut self.0) {
            s.stop().await;
        }
    }
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn per_recipient(stats: &Value) -> BTreeMap<String, u64> {
    serde_json::from_value(stats["per_recipient"].clone()).unwrap_or_default()
}

/// Once past another reconcile window (3 s), the simulator has exactly one
/// send for each of `n` recipients: nothing was sent again.
async fn assert_each_sent_once_after_a_reconcile_window(l: &Loop, n: usize) {
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stats = l.stats().await;
    let sent = per_recipient(&stats);
    assert_eq!(sent.len(), n);
    assert!(sent.values().all(|c| *c == 1), "at most once: {sent:?}");
    assert_eq!(stats["accepted"], n);
}

#[tokio::test(flavor = "multi_thread")]
async fn campaign_of_500_runs_end_to_end_matching_the_simulator() {
    let l = Loop::start(Loop::SOME_UNDELIVERED).await;
    users(&l, 500, "UTC").await;
    let stages = Stages::start(&l, 1);
    let id = start_campaign(&l, "five hundred", json!({"rate_limit_per_second": 1000})).await;
    wait_until(
        "every message final",
        Duration::from_secs(120),
        async || {
            l.app
                .count("SELECT count(*) FROM messages WHERE status IN ('DELIVERED', 'UNDELIVERED')")
                .await
                == 500
        },
    )
    .await;
    let stats = l.stats().await;
    assert_eq!(stats["accepted"], 500);
    let sent = per_recipient(&stats);
    assert_eq!(sent.len(), 500);
    assert!(
        sent.values().all(|n| *n == 1),
        "each recipient exactly once"
    );
    let delivered = l
        .app
        .count("SELECT count(*) FROM messages WHERE status = 'DELIVERED'")
        .await;
    let undelivered = l
        .app
        .count("SELECT count(*) FROM messages WHERE status = 'UNDELIVERED' AND error_code = 30006")
        .await;
    assert_eq!(stats["fates"]["delivered"].as_i64(), Some(delivered));
    assert_eq!(stats["fates"]["undelivered"].as_i64(), Some(undelivered));
    assert!(undelivered > 0, "the failure mix shows up");
    assert_eq!(
        l.app
            .count("SELECT count(*) FROM messages WHERE sent_at IS NOT NULL AND provider_sid LIKE 'SM%'")
            .await,
        500
    );
    // The scheduler marks it COMPLETED.
    l.assert_completes(id).await;
    stages.stop().await;
}

/// The provider answers a send 2 s late, long after both of its status
/// callbacks are stored (parked: no message has the SID yet). The sender
/// writes each SID and folds the callbacks that beat it: every message ends
/// DELIVERED, none stays parked.
#[tokio::test(flavor = "multi_thread")]
async fn callbacks_that_beat_the_providers_answer_are_folded_when_the_sid_is_written() {
    let l = Loop::start(
        r#"
        [provider]
        timeout = "5s"
        [sender]
        reconcile-after = "10s"
        [provider-sim]
        api-latency = "2s"
        "#,
    )
    .await;
    users(&l, 20, "UTC").await;
    let stages = Stages::start(&l, 1);
    start_campaign(&l, "late answers", json!({"rate_limit_per_second": 1000})).await;
    l.app
        .wait_for_count(
            "SELECT count(*) FROM messages WHERE status = 'DELIVERED'",
            20,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(
        l.app
            .count(
                "SELECT count(*) FROM messages
                  WHERE delivered_at < claimed_at + interval '2 seconds' AND sent_at <= delivered_at"
            )
            .await,
        20,
        "each delivery was stored before the provider answered"
    );
    assert_eq!(
        l.app.count("SELECT count(*) FROM receipts_unmatched").await,
        0,
        "nothing left parked"
    );
    stages.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn opt_out_after_fanout_is_never_messaged_and_pause_holds_everything() {
    // 55 sendable at 5/s with the limiter's burst of 20 take ~7 s, so the
    // pause below lands well before the end.
    let l = Loop::start("").await;
    users(&l, 60, "UTC").await;
    // Fan out first, with no sender running.
    let fanout = l.app.start_stage("fanout");
    let id = start_campaign(&l, "careful", json!({"rate_limit_per_second": 5})).await;
    l.app
        .wait_for_count(
            "SELECT count(*) FROM fanout_progress WHERE finished",
            1,
            Duration::from_secs(30),
        )
        .await;
    // Users 1-5 opt out between fan-out and send.
    let c = l.app.pool.get().await.unwrap();
    c.execute(
        "UPDATE users SET consent_state = 'OPT_OUT' WHERE seq <= 5",
        &[],
    )
    .await
    .unwrap();

    let _sender = Proc::new(l.app.spawn_ese(&["run", "sender"]));
    wait_until("a few sends", Duration::from_secs(30), async || {
        l.stats().await["accepted"].as_i64().unwrap_or(0) >= 3
    })
    .await;
    l.api
        .expect(200, "POST", &format!("/api/v1/campaigns/{id}/pause"), None)
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // calls in flight finish
    let paused_at = l.stats().await["accepted"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        l.stats().await["accepted"].as_i64().unwrap(),
        paused_at,
        "nothing sent while paused"
    );
    assert!(paused_at < 55, "paused before the end ({paused_at})");
    l.api
        .expect(200, "POST", &format!("/api/v1/campaigns/{id}/resume"), None)
        .await;
    wait_until("the rest sent", Duration::from_secs(60), async || {
        l.stats().await["accepted"].as_i64().unwrap_or(0) >= 55
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = l.stats().await;
    assert_eq!(stats["accepted"], 55);
    let sent = per_recipient(&stats);
    for i in 1..=5 {
        assert!(
            !sent.contains_key(&phone(i)),
            "opted-out {} was messaged",
            phone(i)
        );
    }
    assert!(sent.values().all(|n| *n == 1));
    assert_eq!(
        l.app
            .count("SELECT count(*) FROM messages WHERE status = 'FAILED' AND failure_reason LIKE 'suppressed%'")
            .await,
        5
    );
    fanout.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quiet_hours_defer_until_the_window_ends() {
    let l = Loop::start("").await;
    users(&l, 5, "UTC").await;
    // A window from a minute ago to 4 s from now, in the users' zone (UTC).
    let now = chrono::Utc::now();
    let start = (now - chrono::Duration::minutes(1))
        .format("%H:%M:%S")
        .to_string();
    let end_at = now + chrono::Duration::seconds(4);
    let end = end_at.format("%H:%M:%S").to_string();
    let stages = Stages::start(&l, 1);
    start_campaign(
        &l,
        "quiet",
        json!({"rate_limit_per_second": 100, "quiet_hours_start": start, "quiet_hours_end": end}),
    )
    .await;
    l.app
        .wait_for_count(
            "SELECT count(*) FROM messages WHERE parked_reason = 'quiet hours'",
            5,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        l.stats().await["accepted"],
        0,
        "nothing sent inside quiet hours"
    );
    wait_until(
        "sends after the window",
        Duration::from_secs(30),
        async || l.stats().await["accepted"].as_i64().unwrap_or(0) == 5,
    )
    .await;
    let stats = l.stats().await;
    let seconds: Vec<i64> = stats["per_second"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.parse().unwrap())
        .collect();
    let end_second = end_at.timestamp() - 1; // the window ends within this second (TIME is whole seconds)
    assert!(
        seconds.iter().all(|s| *s >= end_second),
        "sent at {seconds:?}, window ended {end_second}"
    );
    stages.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_errors_retry_permanent_fail_and_21610_opts_out() {
    let l = Loop::start("").await;
    users(&l, 6, "UTC").await;
    l.script(&phone(1), json!([{"api_error": 30001}])).await;
    l.script(&phone(2), json!([{"api_error": 20429}, {"api_error": 20429}, {"api_error": 20429}, {"api_error": 20429}])).await;
    l.script(&phone(3), json!([{"api_error": 21211}])).await;
    l.script(&phone(4), json!([{"api_error": 21610}])).await;
    let stages = Stages::start(&l, 1);
    start_campaign(&l, "retries", json!({"rate_limit_per_second": 100})).await;
    wait_until(
        "every message settled",
        Duration::from_secs(60),
        async || {
            l.app
                .count("SELECT count(*) FROM messages WHERE status IN ('DELIVERED', 'FAILED')")
                .await
                == 6
        },
    )
    .await;
    let row = |p: String| {
        let pool = l.app.pool.clone();
        async move {
            let c = pool.get().await.unwrap();
            let r = c
                .query_one(
                    "SELECT status, retry_count, error_code FROM messages WHERE recipient_phone = $1",
                    &[&p],
                )
                .await
                .unwrap();
            (
                r.get::<_, String>(0),
                r.get::<_, i32>(1),
                r.get::<_, Option<i32>>(2),
            )
        }
    };
    let (status, retries, _) = row(phone(1)).await;
    assert_eq!(
        (status.as_str(), retries),
        ("DELIVERED", 1),
        "one transient error then success"
    );
    assert_eq!(
        row(phone(2)).await,
        ("FAILED".into(), 3, Some(20429)),
        "three retries, then FAILED"
    );
    assert_eq!(
        row(phone(3)).await,
        ("FAILED".into(), 0, Some(21211)),
        "permanent: FAILED at once"
    );
    assert_eq!(row(phone(4)).await, ("FAILED".into(), 0, Some(21610)));
    assert_eq!(
        l.app
            .count(&format!(
                "SELECT count(*) FROM users WHERE phone_e164 = '{}' AND consent_state = 'OPT_OUT'",
                phone(4)
            ))
            .await,
        1,
        "21610 opts the user out"
    );
    assert_eq!(
        l.app
            .count("SELECT count(*) FROM consent_events WHERE source = 'provider' AND new_state = 'OPT_OUT'")
            .await,
        1
    );
    let stats = l.stats().await;
    assert_eq!(stats["rejected"]["20429"], 4, "initial attempt + 3 retries");
    assert_eq!(stats["accepted"], 3, "users 1, 5 and 6 each accepted once");
    stages.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sender_killed_between_claim_and_answer_never_sends_twice() {
    let l = Loop::start("").await;
    users(&l, 10, "UTC").await;
    // User 3's call hangs: the sender dies waiting for the answer.
    l.script(&phone(3), json!([{"delay_ms": 60000}])).await;
    let stages = Stages::start(&l, 0);
    start_campaign(&l, "crash", json!({"rate_limit_per_second": 100})).await;
    let mut sender = Proc::new(l.app.spawn_ese(&["run", "sender"]));
    wait_until(
        "user 3's call to reach the provider",
        Duration::from_secs(30),
        async || per_recipient(&l.stats().await).contains_key(&phone(3)),
    )
    .await;
    sender.kill9();
    assert_eq!(
        l.app
            .count(&format!(
                "SELECT count(*) FROM messages WHERE recipient_phone = '{}' AND status = 'SENDING'",
                phone(3)
            ))
            .await,
        1,
        "claimed before the call"
    );
    let _sender = Proc::new(l.app.spawn_ese(&["run", "sender"]));
    wait_until("every message sent", Duration::from_secs(60), async || {
        l.app
            .count("SELECT count(*) FROM messages WHERE status IN ('SENT', 'DELIVERED')")
            .await
            == 10
    })
    .await;
    let sent = per_recipient(&l.stats().await);
    assert_eq!(sent.len(), 10);
    assert!(sent.values().all(|n| *n == 1), "at most once: {sent:?}");
    stages.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_answered_after_the_timeout_is_reconciled_not_sent_again() {
    let l = Loop::start("").await;
    users(&l, 10, "UTC").await;
    // User 3's answer comes after the sender's 1 s timeout: unknown outcome.
    l.script(&phone(3), json!([{"delay_ms": 2000}])).await;
    let stages = Stages::start(&l, 1);
    start_campaign(&l, "late answer", json!({"rate_limit_per_second": 100})).await;
    wait_until(
        "every message delivered",
        Duration::from_secs(60),
        async || {
            l.app
                .count("SELECT count(*) FROM messages WHERE status = 'DELIVERED'")
                .await
                == 10
        },
    )
    .await;
    assert_each_sent_once_after_a_reconcile_window(&l, 10).await;
    stages.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_campaign_rate_never_outwaits_the_reconciler() {
    // 1 send/s with no burst, reconciliation after 3 s: sends waiting on the
    // limiter for longer than that must not look lost to the reconciler.
    let l = Loop::start("[sender]\nburst = 1").await;
    users(&l, 8, "UTC").await;
    let stages = Stages::start(&l, 1);
    start_campaign(&l, "slow", json!({"rate_limit_per_second": 1})).await;
    wait_until("8 sends", Duration::from_secs(60), async || {
        l.stats().await["accepted"].as_i64().unwrap_or(0) >= 8
    })
    .await;
    assert_each_sent_once_after_a_reconcile_window(&l, 8).await;
    stages.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_senders_share_the_campaign_rate() {
    let l = Loop::start("").await;
    users(&l, 300, "UTC").await;
    let stages = Stages::start(&l, 2);
    // Let both senders join the group before any send exists.
    tokio::time::sleep(Duration::from_secs(10)).await;
    start_campaign(&l, "shared", json!({"rate_limit_per_second": 50})).await;
    wait_until("300 sends", Duration::from_secs(60), async || {
        l.stats().await["accepted"].as_i64().unwrap_or(0) == 300
    })
    .await;
    let stats = l.stats().await;
    let per_second: BTreeMap<i64, u64> = stats["per_second"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap()))
        .collect();
    let busiest = per_second.values().max().copied().unwrap_or(0);
    // 50/s in total (each process 25/s), never more than the limit plus the
    // configured burst (20, split between the two) in any second.
    assert!(
        busiest <= 50 + 20,
        "a second saw {busiest} sends: {per_second:?}"
    );
    let first = *per_second.keys().next().unwrap();
    let last = *per_second.keys().last().unwrap();
    // Whole seconds (not the first or last) run at the limit, not twice it:
    // together at most the limit per second plus the burst once.
    let whole: Vec<u64> = per_second
        .iter()
        .filter(|(s, _)| **s != first && **s != last)
        .map(|(_, n)| *n)
        .collect();
    let sent: u64 = whole.iter().sum();
    assert!(
        sent <= 50 * whole.len() as u64 + 20,
        "{} whole seconds saw {sent} sends: {per_second:?}",
        whole.len()
    );
    assert!(
        last - first >= 5,
        "300 sends at 50/s take ~6 s, took {}",
        last - first
    );
    stages.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_reads_a_messages_kind_from_its_row_never_from_the_record() {
    let l = Loop::start("").await;
    let (hal, ivy, jay) = ("+14155550201", "+14155550202", "+14155550203");
    let c = l.app.pool.get().await.unwrap();
    c.batch_execute(&format!(
        "INSERT INTO users (phone_e164, consent_state) VALUES
             ('{hal}', 'OPT_OUT'), ('{ivy}', 'UNKNOWN'), ('{jay}', 'OPT_IN');
         INSERT INTO templates (name, content) VALUES ('t', 'Hi');
         INSERT INTO segments (name, filter_criteria) VALUES ('s', '{{\"attribute\": \"x\", \"operator\": \"exists\"}}');
         INSERT INTO campaigns (name, template_id, segment_id, status)
              SELECT 'running', t.id, s.id, 'RUNNING' FROM templates t, segments s;"
    ))
    .await
    .unwrap();
    // (recipient, kind on the row, campaign?) — every record below claims
    // to be an opt-out confirmation.
    let rows = [
        (hal, "reply", false), // a HELP answer made before the STOP
        (hal, "opt_out_confirmation", false),
        (ivy, "reply", false),   // UNKNOWN may get replies
        (ivy, "campaign", true), // ...but no campaign
        (jay, "reply", false),
    ];
    let mut ids = Vec::new();
    for (to, kind, campaign) in rows {
        let id: uuid::Uuid = c
            .query_one(
                "INSERT INTO messages (campaign_id, recipient_phone, rendered_content, kind)
                 VALUES (CASE WHEN $3 THEN (SELECT id FROM campaigns) END, $1, 'hello', $2)
                 RETURNING id",
                &[&to, &kind, &campaign],
            )
            .await
            .unwrap()
            .get(0);
        ids.push(id);
        let campaign_id: Option<uuid::Uuid> = c
            .query_one("SELECT campaign_id FROM messages WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        let forged = ese::records::SendRequest {
            message_id: id,
            campaign_id,
            recipient: to.to_string(),
            channel: ese::model::Channel::Sms,
            body: "hello".into(),
            attempt: 0,
            kind: ese::model::SendKind::OptOutConfirmation,
            not_before: None,
        };
        let topic = l.app.topic("sends");
        let payload = l.app.codec.encode(&topic, &forged).await.unwrap();
        l.app.produce(&topic, to.as_bytes(), &payload).await;
    }
    let _sender = Proc::new(l.app.spawn_ese(&["run", "sender"]));
    l.app
        .wait_for_count(
            "SELECT count(*) FROM messages WHERE status NOT IN ('QUEUED', 'SENDING')",
            5,
            Duration::from_secs(60),
        )
        .await;
    let outcome: Vec<(String, Option<String>)> = c
        .query(
            "SELECT status, failure_reason FROM messages WHERE id = ANY($1) ORDER BY array_position($1, id)",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let failed = |o: &(String, Option<String>), why: &str| {
        o.0 == "FAILED" && o.1.as_deref().is_some_and(|r| r.contains(why))
    };
    assert!(failed(&outcome[0], "opted out"), "{outcome:?}");
    assert!(
        outcome[1].0 != "FAILED",
        "the confirmation goes: {outcome:?}"
    );
    assert!(outcome[2].0 != "FAILED", "{outcome:?}");
    assert!(failed(&outcome[3], "not opted in"), "{outcome:?}");
    assert!(outcome[4].0 != "FAILED", "{outcome:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = per_recipient(&l.stats().await);
    let want: BTreeMap<String, u64> = [(hal, 1), (ivy, 1), (jay, 1)]
        .into_iter()
        .map(|(p, n)| (p.to_string(), n))
        .collect();
    assert_eq!(
        sent, want,
        "one call each: hal's confirmation, ivy's and jay's replies"
    );
}

/// A sender killed after claiming a message and before calling leaves it
/// SENDING; the reconciler asks the provider. The person already got the
/// same text (a second opt-out confirmation): that send is the other
/// message's, so this one is sent, not marked with the other's SID.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_text_twice_is_reconciled_as_two_messages() {
    let l = Loop::start("").await;
    let stages = Stages::start(&l, 1);
    let to = "+14155550401";
    let text = "You are unsubscribed.";
    let c = l.app.pool.get().await.unwrap();
    c.execute("INSERT INTO users (phone_e164) VALUES ($1)", &[&to])
        .await
        .unwrap();
    let insert = "INSERT INTO messages (recipient_phone, rendered_content, kind, idempotency_key)
                  VALUES ($1, $2, 'opt_out_confirmation', $3) RETURNING id";
    let first: uuid::Uuid = c
        .query_one(insert, &[&to, &text, &"reply:first"])
        .await
        .unwrap()
        .get(0);
    let send = ese::records::SendRequest {
        message_id: first,
        campaign_id: None,
        recipient: to.to_string(),
        channel: ese::model::Channel::Sms,
        body: text.to_string(),
        attempt: 0,
        kind: ese::model::SendKind::OptOutConfirmation,
        not_before: None,
    };
    let topic = l.app.topic("sends");
    let payload = l.app.codec.encode(&topic, &send).await.unwrap();
    l.app.produce(&topic, to.as_bytes(), &payload).await;
    let sid_of = async |id: uuid::Uuid| -> (String, Option<String>) {
        let r = c
            .query_one(
                "SELECT status, provider_sid FROM messages WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    wait_until("the first delivered", Duration::from_secs(60), async || {
        sid_of(first).await.0 == "DELIVERED"
    })
    .await;
    // The second: claimed 10 s ago by a sender that died before its call.
    let second: uuid::Uuid = c
        .query_one(
            "INSERT INTO messages (recipient_phone, rendered_content, kind, idempotency_key, status, claimed_at)
             VALUES ($1, $2, 'opt_out_confirmation', 'reply:second', 'SENDING', now() - interval '10 seconds')
             RETURNING id",
            &[&to, &text],
        )
        .await
        .unwrap()
        .get(0);
    wait_until(
        "the second delivered",
        Duration::from_secs(60),
        async || sid_of(second).await.0 == "DELIVERED",
    )
    .await;
    let (a, b) = (sid_of(first).await.1, sid_of(second).await.1);
    assert!(a.is_some() && b.is_some() && a != b, "{a:?} {b:?}");
    assert_eq!(per_recipient(&l.stats().await).get(to), Some(&2));
    stages.stop().await;
}
