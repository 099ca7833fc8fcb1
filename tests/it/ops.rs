//! Operating the engine: replay (`ese replay`), status (`ese status`) and
//! dead letters (`ese dlq`), against the broker and a real run.

use std::collections::BTreeMap;
use std::time::Duration;

use ese::ops::{self, Target};
use ese::records::UserUpsert;
use serde_json::json;

use crate::harness::{Loop, Proc, RunningStage, TestApp};

const WAIT: Duration = Duration::from_secs(90);

fn upsert(phone: &str, attrs: serde_json::Value, at: i64) -> UserUpsert {
    UserUpsert {
        consent: None,
        event_id: None,
        phone: phone.into(),
        attributes: serde_json::from_value(attrs).unwrap(),
        occurred_at: at,
    }
}

async fn produce_upserts(app: &TestApp, upserts: &[UserUpsert]) {
    let topic = app.topic("users.upserts");
    let mut records = Vec::new();
    for u in upserts {
        let payload = app.codec.encode(&topic, u).await.unwrap();
        records.push((u.phone.clone().into_bytes(), payload));
    }
    app.produce_all(&topic, records).await;
}

/// Every pipeline stage: in this process, except the sender (a child
/// process, where the provider credentials are in its environment).
fn start_all(app: &TestApp) -> (Vec<RunningStage>, Proc) {
    let stages = app
        .settings
        .pipelines
        .keys()
        .filter(|s| *s != "sender")
        .map(|s| app.start_stage(s))
        .collect();
    (stages, Proc::new(app.spawn_ese(&["run", "sender"])))
}

async fn stop_all((stages, sender): (Vec<RunningStage>, Proc)) {
    for s in stages {
        s.stop().await;
    }
    sender.terminate().await;
}

async fn wait_all_caught_up(app: &TestApp) {
    for s in app.settings.pipelines.keys() {
        app.wait_caught_up(s, WAIT).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_every_stage_from_earliest_leaves_every_table_as_it_was() {
    let l = Loop::start(Loop::SOME_UNDELIVERED).await;
    let app = &l.app;
    app.seed_users(
        40,
        "jsonb_build_object('plan', 'pro', 'first_name', 'U' || i, 'timezone', 'UTC')",
    )
    .await;
    let stages = start_all(app);
    // Profiles through the users stage, new and existing numbers.
    let t0 = 1_767_225_600_000;
    let mut upserts: Vec<UserUpsert> = (0..10)
        .map(|i| {
            upsert(
                &format!("+1415{}", 3_000_000 + i),
                json!({"plan": "pro", "first_name": format!("N{i}")}),
                t0 + i,
            )
        })
        .collect();
    upserts.push(upsert("+14152000001", json!({"city": "Paris"}), t0 + 50));
    produce_upserts(app, &upserts).await;
    // Two users opt out, one asks for help: consent history and auto-replies.
    let inbound = [
        crate::receipts_consent::inbound("+14152000002", "STOP", t0 + 100),
        crate::receipts_consent::inbound("+14153000003", "stop", t0 + 101),
        crate::receipts_consent::inbound("+14152000004", "HELP", t0 + 102),
    ];
    crate::receipts_consent::publish(app, &inbound.iter().collect::<Vec<_>>()).await;
    wait_all_caught_up(app).await;
    assert_eq!(
        app.count("SELECT count(*) FROM users WHERE consent_state = 'OPT_OUT'")
            .await,
        2
    );

    let id =
        crate::sender::start_campaign(&l, "replayed", json!({"rate_limit_per_second": 500})).await;
    let audience = 40 + 10 - 2;
    app.wait_for_count(
        "SELECT count(*) FROM messages WHERE campaign_id IS NOT NULL AND status IN ('DELIVERED', 'UNDELIVERED')",
        audience,
        WAIT,
    )
    .await;
    // Auto-replies delivered too.
    app.wait_for_count(
        "SELECT count(*) FROM messages WHERE status IN ('QUEUED', 'SENDING', 'SENT')",
        0,
        WAIT,
    )
    .await;
    l.assert_completes(id).await;
    wait_all_caught_up(app).await;

    // While the stages run, replay refuses and names the members.
    let plan = ops::replay_plan(&app.settings, "users", &Target::Earliest)
        .await
        .unwrap();
    let refused = ops::apply_replay(&app.settings, &plan)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("is running") && refused.contains("member"),
        "{refused}"
    );
    let status = ops::status(&app.settings).await.unwrap();
    for s in &status {
        assert_eq!(s.lag, 0, "{} caught up", s.stage);
        assert!(
            !s.members.is_empty(),
            "{} has members while running",
            s.stage
        );
    }
    stop_all(stages).await;
    // Let the stopped stages leave their groups.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let before = app.dump().await;
    let mut again = BTreeMap::new();
    for stage in app.settings.pipelines.keys() {
        let plan = ops::replay_plan(&app.settings, stage, &Target::Earliest)
            .await
            .unwrap();
        for r in &plan.rows {
            assert_eq!(r.new, 0);
            assert_eq!(r.again, r.end, "{stage} {}[{}]", r.topic, r.partition);
        }
        let mut applied = false;
        for _ in 0..30 {
            match ops::apply_replay(&app.settings, &plan).await {
                Ok(()) => {
                    applied = true;
                    break;
                }
                // A stopped member's session may take a moment to expire.
                Err(e) if e.to_string().contains("is running") => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(e) => panic!("{stage}: {e}"),
            }
        }
        assert!(applied, "{stage}: group never emptied");
        again.insert(stage.clone(), plan.again());
    }
    for (stage, n) in &again {
        assert!(*n > 0, "{stage} has records to replay: {again:?}");
    }
    let status = ops::status(&app.settings).await.unwrap();
    for s in &status {
        assert_eq!(s.lag, again[&s.stage], "{} lag after the reset", s.stage);
    }
    let sent_before = l.stats().await["accepted"].clone();

    let stages = start_all(app);
    wait_all_caught_up(app).await;
    // The sender's pump and the receipts' parking run on timers; give them a turn.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_all(stages).await;
    let after = app.dump().await;
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b, a, "replay left every row as it was");
    }
    assert_eq!(
        l.stats().await["accepted"],
        sent_before,
        "nothing sent twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_readably_and_go_back_after_a_fix() {
    // National numbers read in the wrong region are invalid: poison.
    let app =
        TestApp::spawn_with(toml::from_str("[phone]\ndefault-region = \"FR\"").unwrap()).await;
    let t0 = 1_767_225_600_000;
    produce_upserts(
        &app,
        &[
            upsert("(415) 555-2671", json!({"plan": "pro"}), t0),
            upsert("+33612345678", json!({"plan": "fr"}), t0),
        ],
    )
    .await;
    app.produce(&app.topic("users.upserts"), b"k", b"not avro at all")
        .await;
    let users = app.start_stage("users");
    app.wait_caught_up("users", WAIT).await;
    users.stop().await;
    assert_eq!(app.count("SELECT count(*) FROM users").await, 1);

    // status: the DLQ depth and the newest reason.
    let status = ops::status(&app.settings).await.unwrap();
    let s = status.iter().find(|s| s.stage == "users").unwrap();
    assert_eq!(s.dlq_depth, 2);
    assert!(s.newest_dead_letter.is_some());
    let (ok, out, err) = app.run_ese(&["status", "--json"]).await;
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let users_json = json
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "users")
        .unwrap()
        .clone();
    assert_eq!(users_json["dlq_depth"], 2);
    assert_eq!(users_json["lag"], 0);

    // list: headers and a readable body (the decoded record or the text).
    let (ok, out, err) = app.run_ese(&["dlq", "list", "users"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("ese.source.topic"), "{out}");
    assert!(out.contains("(415) 555-2671"), "decoded body: {out}");
    assert!(out.contains("not avro at all"), "text body: {out}");
    assert!(out.contains("2 dead letter(s)"), "{out}");

    // The fix: the right default region. Replay only the phone failures.
    let letters = ops::dead_letters(&app.settings, "users").await.unwrap();
    let phone_failures: Vec<_> = letters
        .into_iter()
        .filter(|d| d.reason().unwrap_or_default().contains("phone"))
        .collect();
    assert_eq!(phone_failures.len(), 1, "reasons name the phone");
    let (ok, out, err) = app
        .run_ese(&["dlq", "replay", "users", "--filter", "PHONE", "--dry-run"])
        .await;
    assert!(ok && out.contains("would replay"), "{out}{err}");
    let mut fixed = app.deps();
    fixed.settings.phone.default_region = "US".into();
    let n = ops::replay_dead_letters(&fixed.settings, "users", &phone_failures)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    let handle = tokio::spawn(async move { ese::stages::run("users", fixed, t).await });
    app.wait_for_count(
        "SELECT count(*) FROM users WHERE phone_e164 = '+14155552671'",
        1,
        WAIT,
    )
    .await;
    app.wait_caught_up("users", WAIT).await;
    token.cancel();
    handle.await.unwrap().unwrap();
    let status = ops::status(&app.settings).await.unwrap();
    let s = status.iter().find(|s| s.stage == "users").unwrap();
    assert_eq!(s.dlq_depth, 2, "nothing new dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_cli_shows_the_plan_and_moves_only_what_it_names() {
    let app = TestApp::spawn().await;
    let t0 = 1_767_225_600_000;
    let upserts: Vec<UserUpsert> = (0..30)
        .map(|i| upsert(&format!("+1415{}", 2_000_000 + i), json!({"n": i}), t0 + i))
        .collect();
    produce_upserts(&app, &upserts).await;
    let users = app.start_stage("users");
    app.wait_caught_up("users", WAIT).await;
    users.stop().await;
    let plan = ops::replay_plan(&app.settings, "users", &Target::Earliest)
        .await
        .unwrap();
    let busy = plan.rows.iter().find(|r| r.end >= 2).unwrap().clone();

    // Dry run: the plan, nothing moved.
    let (ok, out, err) = app
        .run_ese(&["replay", "users", "--to", "earliest", "--dry-run"])
        .await;
    assert!(ok, "{err}");
    assert!(out.contains("30 records will be processed again"), "{out}");
    assert!(out.contains("dry run"), "{out}");
    let offsets = ese::kafka::TopicReader::new(&app.settings.kafka)
        .unwrap()
        .group_offsets(&plan.group, &app.topic("users.upserts"))
        .await
        .unwrap();
    assert!(
        offsets.iter().all(|p| p.lag() == 0),
        "dry run moved nothing"
    );

    // Bad input is named.
    let (ok, _, err) = app
        .run_ese(&["replay", "users", "--to-offset", "0:999999"])
        .await;
    assert!(!ok && err.contains("0:999999"), "{err}");
    let (ok, _, err) = app
        .run_ese(&["replay", "users", "--to-time", "yesterday"])
        .await;
    assert!(!ok && err.contains("RFC 3339"), "{err}");

    // One partition moved back by one record; the others untouched.
    let spec = format!("{}:{}", busy.partition, busy.end - 1);
    let (ok, out, err) = app
        .run_ese(&["replay", "users", "--to-offset", &spec])
        .await;
    assert!(ok, "{err}");
    assert!(out.contains("1 records will be processed again"), "{out}");
    let offsets = ese::kafka::TopicReader::new(&app.settings.kafka)
        .unwrap()
        .group_offsets(&plan.group, &app.topic("users.upserts"))
        .await
        .unwrap();
    let lags: i64 = offsets.iter().map(|p| p.lag()).sum();
    assert_eq!(lags, 1);
    // The stage picks it up from the middle of the producer's batch.
    let users = app.start_stage("users");
    app.wait_caught_up("users", WAIT).await;
    users.stop().await;

    // --follow: the plan applied, then progress until the restarted stage caught up.
    let mut follow =
        Proc::new(app.spawn_ese_piped(&["replay", "users", "--to", "earliest", "--follow"], &[]));
    let reader = ese::kafka::TopicReader::new(&app.settings.kafka).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let offsets = reader
            .group_offsets(&plan.group, &app.topic("users.upserts"))
            .await
            .unwrap();
        if offsets.iter().map(|p| p.lag()).sum::<i64>() == 30 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replay never moved the group"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let users = app.start_stage("users");
    let mut stdout = follow.child().stdout.take().unwrap();
    let out = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(out.contains("30 records will be processed again"), "{out}");
    assert!(out.contains("users caught up"), "{out}");
    assert!(follow.child().wait().unwrap().success());
    users.stop().await;

    // A time after every record: nothing to process again, the group at the end.
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (ok, out, err) = app
        .run_ese(&["replay", "users", "--to-time", &future])
        .await;
    assert!(ok, "{err}");
    assert!(out.contains("0 records will be processed again"), "{out}");
}

/// `ese status` on the SQLite storage (durable, a choice beside the default
/// journal): the running stage's group is described with its member and no
/// lag (the storage read a group's stored detail as a JSON string and the
/// broker dropped every DescribeGroups).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_describes_running_groups_on_durable_storage() {
    let port = crate::harness::free_port();
    let db = crate::harness::BrokerDb::sqlite();
    let mut broker = crate::harness::spawn_broker(port, &db.storage());
    let app = TestApp::spawn_with(
        toml::from_str(&format!("[kafka]\nbrokers = \"127.0.0.1:{port}\"")).unwrap(),
    )
    .await;
    produce_upserts(
        &app,
        &[upsert(
            "+14155552671",
            json!({"plan": "pro"}),
            1_767_225_600_000,
        )],
    )
    .await;
    let users = app.start_stage("users");
    app.wait_caught_up("users", WAIT).await;
    let status = ops::status(&app.settings)
        .await
        .expect("status on SQLite storage");
    let s = status
        .iter()
        .find(|s| s.stage == "users")
        .expect("users listed");
    assert_eq!(s.members.len(), 1, "{s:?}");
    assert_eq!(s.lag, 0, "{s:?}");
    let (ok, out, err) = app.run_ese(&["status"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("users"), "{out}");
    users.stop().await;
    broker.kill9();
}
