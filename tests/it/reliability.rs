//! The reliability suite: failures injected under load, each scenario ending
//! with the same checks ([`assert_nothing_lost`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;

use crate::harness::{Loop, Proc};

/// Campaign recipients (all opted in at the start, no quiet hours).
const RECIPIENTS: i64 = 300;
/// Recipients texting STOP, START, STOP while the campaign runs.
const TEXTERS: usize = 40;
const KEYWORDS: [&str; 3] = ["STOP", "START", "STOP"];

/// Texter `i`: campaign recipient 1 + 7i, spread over the audience so some
/// opt-outs land before their message goes out and some after.
fn texter(i: usize) -> String {
    format!("+1415{}", 2_000_001 + 7 * i)
}

/// The texters' numbers as an SQL list.
fn texters_sql() -> String {
    (0..TEXTERS)
        .map(|i| format!("'{}'", texter(i)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Posts an inbound text through the bridge, signed as the provider does;
/// one not answered 2xx is sent again, as the provider does, until `until`
/// (the same request, so the same event id). Whether it was answered 2xx.
async fn send_text(l: &Loop, from: &str, body: &str, until: Instant) -> bool {
    let path = "/webhooks/twilio/inbound";
    let url = format!("{}{path}", l.app.settings.bridge.public_url);
    let params: Vec<(String, String)> = [
        ("MessageSid", format!("SM{}", uuid::Uuid::new_v4().simple())),
        ("AccountSid", crate::harness::SIM_ACCOUNT.to_string()),
        ("From", from.to_string()),
        ("To", "+15005550006".to_string()),
        ("Body", body.to_string()),
        ("NumMedia", "0".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let signature = ese::twilio::signature::sign(crate::fixtures::TOKEN, &url, &params);
    let form = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&params)
        .finish();
    loop {
        let r = l
            .bridge
            .post_form(path, form.clone(), Some(&signature))
            .await;
        if r.status().is_success() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Each texter's keywords through the bridge; how many were answered 2xx.
pub(crate) async fn text_in(l: &Loop) -> usize {
    // Retries stop after two minutes, so a bridge that never recovers fails
    // the checks instead of hanging the test.
    let until = Instant::now() + Duration::from_secs(120);
    let mut accepted = 0;
    for keyword in KEYWORDS {
        for i in 0..TEXTERS {
            if send_text(l, &texter(i), keyword, until).await {
                accepted += 1;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    accepted
}

/// The first column (text) of every row of `sql`.
async fn lines(l: &Loop, sql: &str) -> Vec<String> {
    let c = l.app.pool.get().await.expect("db");
    c.query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Reads a pair of values until they agree or `timeout` passes; returns the
/// last pair read.
async fn agree<T, F, Fut>(timeout: Duration, mut read: F) -> (T, T)
where
    T: PartialEq,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (T, T)>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let (a, b) = read().await;
        if a == b || Instant::now() > deadline {
            return (a, b);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `sql` (one bigint) until it equals `want`; returns the last value.
async fn settle(l: &Loop, sql: &str, want: i64, timeout: Duration) -> i64 {
    agree(timeout, || async { (l.app.count(sql).await, want) })
        .await
        .0
}

/// The checks every scenario ends with: every webhook answered 2xx is in
/// Postgres exactly once; every message reached the simulator at most once,
/// and each campaign recipient exactly once; nobody opted out was sent a
/// campaign message after opting out; the consent history is complete.
async fn assert_nothing_lost(l: &Loop, campaign: uuid::Uuid, inbound_accepted: usize) {
    let final_sql = format!(
        "SELECT count(*) FROM messages WHERE campaign_id = '{campaign}'
            AND status IN ('DELIVERED', 'UNDELIVERED', 'FAILED')"
    );
    let finals = settle(l, &final_sql, RECIPIENTS, Duration::from_secs(120)).await;
    if finals != RECIPIENTS {
        let unfinished = lines(
            l,
            &format!(
                "SELECT m.recipient_phone || ' ' || m.status || ' sid ' || coalesce(m.provider_sid, '-') || ' receipts: ' ||
                        coalesce((SELECT string_agg(d.message_status, ',' ORDER BY d.received_at)
                                    FROM delivery_receipts d WHERE d.message_sid = m.provider_sid), 'none')
                   FROM messages m
                  WHERE m.campaign_id = '{campaign}' AND m.status NOT IN ('DELIVERED', 'UNDELIVERED', 'FAILED')
                  LIMIT 10"
            ),
        )
        .await;
        panic!(
            "{finals} of {RECIPIENTS} campaign messages final; unfinished: {unfinished:#?}; simulator: {}",
            l.stats().await
        );
    }

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
    let texters = texters_sql();
    let opted_out = l
        .app
        .count(&format!(
            "SELECT count(*) FROM users WHERE phone_e164 IN ({texters}) AND consent_state = 'OPT_OUT'"
        ))
        .await;
    assert_eq!(opted_out, TEXTERS as i64, "every texter ends opted out");

    // Status callbacks: once the simulator is done, one receipt per callback
    // the bridge answered 2xx.
    let (callbacks, receipts) = agree(Duration::from_secs(60), || async {
        let stats = l.stats().await;
        let callbacks = stats["callbacks"]["sent"].as_i64().unwrap_or(-1);
        let receipts = l.app.count("SELECT count(*) FROM delivery_receipts").await;
        (callbacks, receipts)
    })
    .await;
    assert_eq!(
        receipts, callbacks,
        "status callbacks answered 2xx vs receipt rows"
    );
    let unique = l
        .app
        .count("SELECT count(DISTINCT event_id) FROM delivery_receipts")
        .await;
    assert_eq!(unique, receipts, "no receipt stored twice");

    // Sends: the simulator's count per recipient is exactly the messages sent
    // to it, once the sends still going on (a reply retried, one left to the
    // reconciler) are over: both sides are read until they agree or 60 s pass.
    let c = l.app.pool.get().await.expect("db");
    let (seen, sent) = agree(Duration::from_secs(60), || async {
        let stats = l.stats().await;
        let seen: BTreeMap<String, i64> =
            serde_json::from_value(stats["per_recipient"].clone()).expect("per_recipient");
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
        (seen, sent)
    })
    .await;
    assert_eq!(seen, sent, "simulator sends per recipient vs messages sent");
    // Recipients who never opted out: each sent exactly once. Texters: sent
    // (while opted in) or held back as opted out, never both.
    let once = l
        .app
        .count(&format!(
            "SELECT count(*) FROM messages WHERE campaign_id = '{campaign}'
                AND provider_sid IS NOT NULL AND recipient_phone NOT IN ({texters})"
        ))
        .await;
    assert_eq!(
        once,
        RECIPIENTS - TEXTERS as i64,
        "each recipient who stayed opted in sent exactly once"
    );
    let texters_done = l
        .app
        .count(&format!(
            "SELECT count(*) FROM messages WHERE campaign_id = '{campaign}'
                AND recipient_phone IN ({texters})
                AND (provider_sid IS NOT NULL) <> coalesce(failure_reason LIKE 'suppressed%', false)"
        ))
        .await;
    assert_eq!(
        texters_done, TEXTERS as i64,
        "each texter's message sent or suppressed"
    );
    // No campaign message was claimed for sending while its recipient was
    // opted out: after an opt-out recorded a second before the claim (its
    // transaction may still have been open at its own timestamp) with no
    // opt-in recorded between them. Events applied in one transaction share
    // recorded_at (now()) and took effect in occurred_at order.
    let sent_opted_out = lines(
        l,
        &format!(
                "SELECT m.recipient_phone || ' claimed ' || m.claimed_at || ', consent: ' ||
                        (SELECT string_agg(e.new_state || ' ' || e.recorded_at, ', ' ORDER BY e.recorded_at, e.occurred_at)
                           FROM consent_events e WHERE e.phone_number = m.recipient_phone AND e.applied)
                   FROM messages m
                  WHERE m.campaign_id = '{campaign}' AND m.provider_sid IS NOT NULL
                    AND EXISTS (
                        SELECT 1 FROM consent_events o
                         WHERE o.phone_number = m.recipient_phone AND o.applied AND o.new_state = 'OPT_OUT'
                           AND o.recorded_at < m.claimed_at - interval '1 second'
                           AND NOT EXISTS (
                               SELECT 1 FROM consent_events i
                                WHERE i.phone_number = o.phone_number AND i.applied AND i.new_state = 'OPT_IN'
                                  AND (i.recorded_at, i.occurred_at) > (o.recorded_at, o.occurred_at)
                                  AND i.recorded_at < m.claimed_at))"
        ),
    )
    .await;
    assert!(
        sent_opted_out.is_empty(),
        "campaign messages sent while opted out: {sent_opted_out:#?}"
    );
}

pub(crate) const WEBHOOK_STAGES: [&str; 4] = ["run", "normalize", "receipts", "consent"];
pub(crate) const SEND_STAGES: [&str; 3] = ["run", "fanout", "sender"];

/// The load of the full-loop scenarios: the campaign audience seeded, the
/// webhook stages and the send stages each in a child process, and the
/// campaign started once both have joined their groups and fanned out. The
/// texts come from [`text_in`], run beside the scenario's disturbance.
pub(crate) struct Load {
    webhooks: Proc,
    sends: Proc,
    pub(crate) campaign: uuid::Uuid,
}

impl Load {
    pub(crate) async fn start(l: &Loop) -> Load {
        l.app
            .seed_users(
                RECIPIENTS,
                "jsonb_build_object('plan', 'pro', 'first_name', 'U' || i)",
            )
            .await;
        let webhooks = Proc::new(l.app.spawn_ese(&WEBHOOK_STAGES));
        let sends = Proc::new(l.app.spawn_ese(&SEND_STAGES));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let campaign =
            crate::sender::start_campaign(l, "reliable", json!({"rate_limit_per_second": 100}))
                .await;
        // Fanned out before anyone texts, so every texter is in the audience
        // (sending at 100/s goes on for about three seconds more).
        l.app
            .wait_for_count(
                &format!("SELECT count(*) FROM messages WHERE campaign_id = '{campaign}'"),
                RECIPIENTS,
                Duration::from_secs(30),
            )
            .await;
        Load {
            webhooks,
            sends,
            campaign,
        }
    }

    /// That a disturbance lands while texts are still coming in.
    pub(crate) async fn assert_mid_load(l: &Loop) {
        let stored = l.app.count("SELECT count(*) FROM inbound_events").await;
        assert!(
            stored < (TEXTERS * KEYWORDS.len()) as i64,
            "the disturbance came after the load ({stored} texts stored)"
        );
    }

    /// The checks, once every text was answered 2xx; the campaign completes.
    pub(crate) async fn assert_nothing_lost(&self, l: &Loop, accepted: usize) {
        assert_eq!(
            accepted,
            TEXTERS * KEYWORDS.len(),
            "every text answered 2xx in the end"
        );
        assert_nothing_lost(l, self.campaign, accepted).await;
        l.assert_completes(self.campaign).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_processes_killed_at_random_under_load_lose_nothing() {
    let l = Loop::start(Loop::SOME_UNDELIVERED).await;
    let mut load = Load::start(&l).await;
    let kills = async {
        for round in 0..4 {
            let wait = rand::rng().random_range(300..1200);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if round % 2 == 0 {
                load.webhooks.kill9();
                load.webhooks = Proc::new(l.app.spawn_ese(&WEBHOOK_STAGES));
            } else {
                load.sends.kill9();
                load.sends = Proc::new(l.app.spawn_ese(&SEND_STAGES));
            }
        }
    };
    let (accepted, ()) = tokio::join!(text_in(&l), kills);
    load.assert_nothing_lost(&l, accepted).await;
}

/// A loop on the broker at `port` (a child process the scenario stops), whose
/// simulator retries callbacks through an outage of several seconds.
async fn loop_on_broker(port: u16) -> Loop {
    Loop::start(&format!(
        r#"
        [kafka]
        brokers = "127.0.0.1:{port}"
        [provider-sim]
        callback-retries = 10
        failures = [{{ code = 30006, status = "undelivered", rate = 0.1 }}]
        "#
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarted_on_durable_storage_under_load_loses_nothing() {
    let port = crate::harness::free_port();
    let db = crate::harness::BrokerDb::new();
    let storage = db.storage();
    let mut broker = crate::harness::spawn_broker(port, &storage);
    let l = loop_on_broker(port).await;
    let load = Load::start(&l).await;
    // kill -9 while the campaign and the texts are under way, down for two
    // seconds, back on the same storage.
    let outage = async {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        broker.kill9();
        Load::assert_mid_load(&l).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        broker = tokio::task::block_in_place(|| crate::harness::spawn_broker(port, &storage));
    };
    let (accepted, ()) = tokio::join!(text_in(&l), outage);
    load.assert_nothing_lost(&l, accepted).await;
    drop(load);
    broker.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_frozen_past_the_session_timeout_under_load_loses_nothing() {
    let port = crate::harness::free_port();
    let mut broker = crate::harness::spawn_broker(port, "memory://frozen/");
    let pid = broker.child().id().to_string();
    let l = loop_on_broker(port).await;
    let load = Load::start(&l).await;
    // SIGSTOP for longer than the 6 s session timeout: every member is
    // expelled and the group rebalances once the broker runs again.
    let freeze = async {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        crate::harness::signal(&pid, "-STOP");
        Load::assert_mid_load(&l).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        crate::harness::signal(&pid, "-CONT");
    };
    let (accepted, ()) = tokio::join!(text_in(&l), freeze);
    load.assert_nothing_lost(&l, accepted).await;
    drop(load);
    broker.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_mixed_into_the_load_is_dead_lettered_and_the_rest_unaffected() {
    let l = Loop::start(Loop::SOME_UNDELIVERED).await;
    let load = Load::start(&l).await;
    let app = &l.app;
    // A campaign and a message that do not exist.
    let (nobody, nothing) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let poison = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Avro cut short, and JSON where Avro belongs, on the raw topics.
        let raw = app.topic("webhooks.status.raw");
        let whole = app
            .codec
            .encode(
                &raw,
                &crate::receipts_consent::inbound("+14155550100", "hi", 0),
            )
            .await
            .unwrap();
        app.produce(&raw, b"cut-short", &whole[..whole.len() / 2])
            .await;
        app.produce(
            &app.topic("webhooks.inbound.raw"),
            b"json",
            br#"{"kind": "inbound", "params": {"From": "+14155550100"}}"#,
        )
        .await;
        // A signed text from a number that is no phone number.
        let until = Instant::now() + Duration::from_secs(60);
        assert!(send_text(&l, "call me maybe", "STOP", until).await);
        // A start command and a send for things that do not exist.
        let commands = app.topic("campaigns.commands");
        let start = ese::records::CampaignCommand {
            command_id: uuid::Uuid::new_v4().to_string(),
            campaign_id: nobody,
            command: ese::model::CampaignAction::Start,
            status: ese::model::CampaignStatus::Running,
            issued_by: "test".into(),
            issued_at: 0,
        };
        let payload = app.codec.encode(&commands, &start).await.unwrap();
        app.produce(&commands, nobody.to_string().as_bytes(), &payload)
            .await;
        let sends = app.topic("sends");
        let send = ese::records::SendRequest {
            message_id: nothing,
            campaign_id: Some(nobody),
            recipient: "+14155550100".into(),
            channel: ese::model::Channel::Sms,
            body: "hello".into(),
            attempt: 0,
            kind: ese::model::SendKind::Campaign,
            not_before: None,
        };
        let payload = app.codec.encode(&sends, &send).await.unwrap();
        app.produce(&sends, b"+14155550100", &payload).await;
    };
    let (accepted, ()) = tokio::join!(text_in(&l), poison);
    // The invalid number's text is kept in the audit trail (marked INVALID)
    // besides the texters' ones.
    assert_eq!(
        app.count("SELECT count(*) FROM inbound_events WHERE processing_status = 'INVALID'")
            .await,
        1
    );
    assert_eq!(
        accepted,
        TEXTERS * KEYWORDS.len(),
        "every text answered 2xx"
    );
    assert_nothing_lost(&l, load.campaign, accepted + 1).await;
    l.assert_completes(load.campaign).await;

    let reason = |records: &[crate::harness::InRecordView], key: &[u8]| -> String {
        records
            .iter()
            .find(|r| r.key.as_deref() == Some(key))
            .and_then(|r| r.header("ese.error"))
            .unwrap_or_else(|| panic!("{} not dead-lettered", String::from_utf8_lossy(key)))
            .to_string()
    };
    let normalize = app.read_topic(&app.topic("dlq.normalize"), 3, Duration::from_secs(30));
    assert_eq!(normalize.len(), 3, "three poison webhooks in dlq.normalize");
    assert!(reason(&normalize, b"cut-short").contains("undecodable"));
    assert!(reason(&normalize, b"json").contains("undecodable"));
    assert!(reason(&normalize, b"call me maybe").contains("call me maybe"));
    let fanout = app.read_topic(&app.topic("dlq.fanout"), 1, Duration::from_secs(30));
    assert!(
        reason(&fanout, nobody.to_string().as_bytes())
            .contains(&format!("unknown campaign {nobody}"))
    );
    let sender = app.read_topic(&app.topic("dlq.sender"), 1, Duration::from_secs(30));
    assert!(
        reason(&sender, b"+14155550100").contains(&format!("message {nothing} does not exist"))
    );
}

/// A PostgreSQL server of the test's own (initdb into a temp dir, a free
/// port), so restarting it disturbs no other test. Stopped and removed on drop.
struct PrivatePostgres {
    dir: std::path::PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// The newest installed server's binaries (Debian's layout).
    fn bin() -> String {
        let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        versions.sort_unstable();
        let v = versions.last().expect("a PostgreSQL version installed");
        format!("/usr/lib/postgresql/{v}/bin")
    }

    /// Runs a server binary as the `postgres` user when we are root (initdb refuses root).
    fn run(&self, tool: &str, args: &[&str]) {
        let bin = format!("{}/{tool}", Self::bin());
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false);
        let mut cmd = if root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", &bin]);
            c
        } else {
            std::process::Command::new(&bin)
        };
        let out = cmd.args(args).output().expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start() -> PrivatePostgres {
        let dir = std::env::temp_dir().join(format!("ese-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let _ = std::process::Command::new("chown")
            .args(["postgres", &dir.to_string_lossy()])
            .status();
        let pg = PrivatePostgres {
            dir,
            port: crate::harness::free_port(),
        };
        let data = pg.data();
        pg.run("initdb", &["-D", &data, "-A", "trust", "-U", "postgres"]);
        pg.ctl(&["start"]);
        pg
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    /// `pg_ctl ARGS…` on this server (waits for the action to finish).
    fn ctl(&self, args: &[&str]) {
        let (data, dir) = (self.data(), self.dir.to_string_lossy().into_owned());
        let opts = format!(
            "-p {} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port
        );
        let log = format!("{dir}/log");
        let mut all = vec![
            "-D",
            data.as_str(),
            "-o",
            opts.as_str(),
            "-l",
            log.as_str(),
            "-w",
        ];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all);
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data();
        let bin = format!("{}/pg_ctl", Self::bin());
        let _ = std::process::Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &bin,
                "-D",
                &data,
                "-m",
                "immediate",
                "stop",
            ])
            .output();
        let _ = std::process::Command::new(&bin)
            .args(["-D", &data, "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_and_crashed_under_load_loses_nothing() {
    let pg = PrivatePostgres::start();
    let l = Loop::start(&format!(
        "{}\n[database]\nurl = \"{}\"",
        Loop::SOME_UNDELIVERED,
        pg.url("postgres")
    ))
    .await;
    let load = Load::start(&l).await;
    // A fast restart, then a crash (immediate stop) with two seconds down,
    // while the campaign and the texts are under way.
    let outage = async {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        Load::assert_mid_load(&l).await;
        tokio::task::block_in_place(|| pg.ctl(&["-m", "fast", "restart"]));
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        tokio::task::block_in_place(|| pg.ctl(&["-m", "immediate", "stop"]));
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::block_in_place(|| pg.ctl(&["start"]));
    };
    let (accepted, ()) = tokio::join!(text_in(&l), outage);
    load.assert_nothing_lost(&l, accepted).await;
}
