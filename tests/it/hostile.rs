//! Hostile input: property tests (no panic, bounded time) for every parser
//! that sees outside data, and 10,000 malformed or unsigned webhooks against a
//! bridge process.

use std::time::{Duration, Instant};

use ese::campaigns::{segment, template};
use ese::twilio::signature;
use proptest::prelude::*;
use serde_json::Value;

use crate::harness::{Proc, TestApp, free_port};

/// A case that takes longer than this is a failure (unbounded work).
const CASE_BUDGET: Duration = Duration::from_secs(1);

fn within_budget<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    assert!(
        started.elapsed() < CASE_BUDGET,
        "{what} took {:?}",
        started.elapsed()
    );
    out
}

/// Arbitrary JSON, biased towards the shapes the segment DSL reads.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
        prop_oneof![
            Just("AND"),
            Just("OR"),
            Just("NOT"),
            Just("equals"),
            Just("in"),
            Just("not_in"),
            Just("contains"),
            Just("starts_with"),
            Just("gt"),
            Just("lte"),
            Just("before"),
            Just("after"),
            Just("exists"),
            Just("not_exists"),
            Just("2026-01-01T00:00:00Z"),
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("attribute".to_string()),
                    Just("operator".to_string()),
                    Just("value".to_string()),
                    Just("conditions".to_string()),
                    ".{0,12}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Well-formed filters with hostile attribute names and values.
fn filter() -> impl Strategy<Value = Value> {
    let op = prop_oneof![
        Just("equals"),
        Just("not_equals"),
        Just("contains"),
        Just("starts_with"),
        Just("in"),
        Just("not_in"),
        Just("gt"),
        Just("lte"),
        Just("before"),
        Just("exists"),
    ];
    let text = prop_oneof![".{0,30}", Just("'); DROP TABLE users; --".to_string())];
    let leaf = (
        text.clone(),
        op,
        text.clone(),
        prop::collection::vec(text, 1..4),
        any::<i32>(),
    )
        .prop_map(|(attribute, op, value, list, n)| {
            let value = match op {
                "in" | "not_in" => serde_json::json!(list),
                "gt" | "lte" => serde_json::json!(n),
                "before" => serde_json::json!("2026-01-01T00:00:00Z"),
                "exists" => Value::Null,
                _ => Value::String(value),
            };
            let mut leaf = serde_json::json!({"attribute": attribute, "operator": op});
            if !value.is_null() {
                leaf["value"] = value;
            }
            leaf
        });
    leaf.prop_recursive(4, 32, 4, |inner| {
        (
            prop_oneof![Just("AND"), Just("OR"), Just("NOT")],
            prop::collection::vec(inner, 1..4),
        )
            .prop_map(|(op, mut conditions)| {
                if op == "NOT" {
                    conditions.truncate(1);
                }
                serde_json::json!({"operator": op, "conditions": conditions})
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn signature_check_never_panics_and_accepts_its_own_signature(
        token in ".{0,40}",
        url in ".{0,80}",
        params in prop::collection::vec((".{0,20}", ".{0,60}"), 0..12),
        provided in proptest::option::of(".{0,40}"),
    ) {
        within_budget("verify", || {
            let _ = signature::verify(std::slice::from_ref(&token), &url, &params, provided.as_deref());
            let good = signature::sign(&token, &url, &params);
            prop_assert!(signature::verify(std::slice::from_ref(&token), &url, &params, Some(&good)).is_ok());
            Ok(())
        })?;
    }

    #[test]
    fn form_bodies_parse_without_panic(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        within_budget("form parse", || {
            let pairs: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
            let _ = signature::verify(&["t".to_string()], "https://h/p", &pairs, Some("x"));
            let _ = signature::body_sha256(&body);
        });
    }

    #[test]
    fn segment_filters_parse_and_compile_values_only_as_parameters(
        filter in prop_oneof![json(), filter()],
    ) {
        within_budget("segment", || {
            if let Ok(node) = segment::parse(&filter, 8) {
                let compiled = segment::compile(&node, "u", 1);
                let placeholders = (1..=compiled.params.len()).all(|i| compiled.sql.contains(&format!("${i}")));
                prop_assert!(placeholders, "every parameter is bound: {}", compiled.sql);
                for p in &compiled.params {
                    if let segment::SqlParam::Text(t) = p
                        && t.len() > 3
                        && t.contains(['\'', ';', '"', '-'])
                    {
                        prop_assert!(!compiled.sql.contains(t.as_str()), "{t:?} spliced into {}", compiled.sql);
                    }
                }
            }
            Ok(())
        })?;
    }

    #[test]
    fn phone_numbers_normalize_to_e164_or_an_error(input in ".{0,40}", digits in "[+0-9 ()-]{0,24}") {
        let n = ese::phone::Normalizer::new("US");
        for text in [&input, &digits] {
            within_budget("phone", || {
                if let Ok(e164) = n.e164(text) {
                    prop_assert!(e164.starts_with('+') && e164.len() <= 16 && e164[1..].chars().all(|c| c.is_ascii_digit()), "{e164}");
                }
                let _ = n.address(text);
                Ok(())
            })?;
        }
    }

    #[test]
    fn templates_parse_render_and_measure_without_panic(
        body in ".{0,200}",
        braces in "[{}a-z_ ]{0,60}",
        value in proptest::option::of(".{0,50}"),
    ) {
        for text in [&body, &braces] {
            within_budget("template", || {
                if let Ok(t) = template::parse(text) {
                    let _ = t.variables();
                    if let Ok(out) = t.render(|_| value.clone()) {
                        let _ = template::length(&out);
                    }
                }
                let _ = template::length(text);
            });
        }
    }

    #[test]
    fn avro_decoding_of_garbage_and_damaged_records_is_an_error_not_a_panic(
        garbage in prop::collection::vec(any::<u8>(), 0..512),
        cut in 0usize..200,
        flip in (0usize..200, any::<u8>()),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let codec = ese::codec::Codec::single_object().unwrap();
            let good = codec
                .encode("t", &ese::records::UserUpsert {
                    consent: None,
                    event_id: Some("e".into()),
                    phone: "+14155550100".into(),
                    attributes: [("a".to_string(), serde_json::json!("b"))].into(),
                    occurred_at: 1,
                })
                .await
                .unwrap();
            let mut damaged = good.clone();
            if let Some(b) = damaged.get_mut(flip.0) {
                *b ^= flip.1;
            }
            let truncated = good[..cut.min(good.len())].to_vec();
            for bytes in [&garbage, &damaged, &truncated] {
                let started = Instant::now();
                let _ = codec.decode::<ese::records::UserUpsert>(bytes).await;
                let _ = codec.decode::<ese::records::WebhookRaw>(bytes).await;
                let _ = codec.decode::<ese::records::SendRequest>(bytes).await;
                let _ = codec.describe(bytes).await;
                assert!(started.elapsed() < CASE_BUDGET);
            }
        });
    }
}

/// Resident memory of process `pid` in kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_or_unsigned_webhooks_get_4xx_and_produce_nothing() {
    use rand::{Rng, SeedableRng};
    let app = TestApp::spawn().await;
    let (port, metrics_port) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{port}");
    let mut bridge = Proc::new(app.spawn_ese_piped(
        &["serve"],
        &[
            ("ESE__BRIDGE__LISTEN", format!("127.0.0.1:{port}")),
            ("ESE__BRIDGE__PUBLIC_URL", base.clone()),
            ("ESE__ADMIN__LISTEN", format!("127.0.0.1:{}", free_port())),
            ("ESE__METRICS__LISTEN", format!("127.0.0.1:{metrics_port}")),
        ],
    ));
    let http = ese::http::client_builder().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "bridge did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = crate::fixtures::TOKEN;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut requests = Vec::with_capacity(10_000);
    for i in 0..10_000usize {
        let path = if rng.random_bool(0.5) {
            "/webhooks/twilio/status"
        } else {
            "/webhooks/twilio/inbound"
        };
        let garbage: Vec<u8> = (0..rng.random_range(0..400))
            .map(|_| rng.random())
            .collect();
        // (content type, body, signature)
        let req: (&str, Vec<u8>, Option<String>) = match i % 6 {
            // random bytes, no signature
            0 => ("application/x-www-form-urlencoded", garbage, None),
            // a plausible form with a wrong signature
            1 => (
                "application/x-www-form-urlencoded",
                format!("MessageSid=SM{i:032}&MessageStatus=delivered&From=%2B14155550100")
                    .into_bytes(),
                Some(format!("bogus{i}")),
            ),
            // correctly signed but missing MessageSid
            2 => {
                let params = vec![
                    ("MessageStatus".to_string(), "sent".to_string()),
                    ("Body".to_string(), format!("{i}")),
                ];
                let sig = signature::sign(token, &format!("{base}{path}"), &params);
                (
                    "application/x-www-form-urlencoded",
                    b"MessageStatus=sent&Body="
                        .iter()
                        .copied()
                        .chain(i.to_string().into_bytes())
                        .collect(),
                    Some(sig),
                )
            }
            // wrong content type
            3 => ("text/plain", garbage, None),
            // JSON variant whose bodySHA256 does not match
            4 => (
                "application/json",
                br#"{"MessageSid":"SMx"}"#.to_vec(),
                Some("x".into()),
            ),
            // too large
            _ => (
                "application/x-www-form-urlencoded",
                vec![b'a'; 70_000 + (i % 100)],
                None,
            ),
        };
        requests.push((path, req));
    }
    let mut rss_warm = 0;
    let mut statuses = std::collections::BTreeMap::new();
    for (n, chunk) in requests.chunks(500).enumerate() {
        let sends = chunk.iter().map(|(path, (ct, body, sig))| {
            let json = *ct == "application/json";
            let url = if json {
                format!("{base}{path}?bodySHA256=00")
            } else {
                format!("{base}{path}")
            };
            let mut r = http
                .post(url)
                .header("content-type", *ct)
                .body(body.clone());
            if let Some(s) = sig {
                r = r.header("x-twilio-signature", s.as_str());
            }
            r.send()
        });
        for r in futures::future::join_all(sends).await {
            let status = r.expect("bridge answers").status().as_u16();
            *statuses.entry(status).or_insert(0) += 1;
        }
        // The baseline is taken once warmed up (allocator arenas, buffers):
        // flat means the second 5,000 requests add nothing.
        if n == 9 {
            rss_warm = rss_kb(bridge.child().id());
        }
    }
    let rss_end = rss_kb(bridge.child().id());
    assert!(
        statuses.keys().all(|s| (400..500).contains(s)),
        "only 4xx: {statuses:?}"
    );
    assert_eq!(statuses.values().sum::<usize>(), 10_000);
    for s in [400, 403, 413, 415] {
        assert!(statuses.contains_key(&s), "{s} seen: {statuses:?}");
    }
    let reader = ese::kafka::TopicReader::new(&app.settings.kafka).unwrap();
    for topic in ["webhooks.status.raw", "webhooks.inbound.raw"] {
        assert_eq!(
            reader.depth(&app.topic(topic)).await.unwrap(),
            0,
            "nothing produced on {topic}"
        );
    }
    let metrics = http
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("ese_bridge_signature_failures_total{reason=\"mismatch\"}"),
        "{metrics}"
    );
    assert!(
        rss_end < rss_warm + 30_000,
        "bridge memory flat: {rss_warm} kB after 5,000 requests, {rss_end} kB after 10,000"
    );
    bridge.terminate().await;
}

/// Signed inbound `body` from `from` (its MessageSid `sid`) posted to the
/// bridge under idempotency token `token`; the HTTP status.
async fn post_inbound(
    bridge: &crate::harness::RunningBridge,
    sid: &str,
    from: &str,
    body: &str,
    token: &str,
) -> u16 {
    let path = "/webhooks/twilio/inbound";
    let params: Vec<(String, String)> = [
        ("MessageSid", sid),
        ("AccountSid", crate::harness::SIM_ACCOUNT),
        ("From", from),
        ("To", "+15005550006"),
        ("Body", body),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let sig = signature::sign(
        crate::fixtures::TOKEN,
        &format!("{}{path}", crate::fixtures::PUBLIC_URL),
        &params,
    );
    let form = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&params)
        .finish();
    bridge
        .http
        .post(format!("{}{path}", bridge.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .header("i-twilio-idempotency-token", token)
        .body(form)
        .send()
        .await
        .expect("bridge answers")
        .status()
        .as_u16()
}

/// A captured, signed START sent again under new idempotency tokens (the
/// header is not signed) is the same event: it cannot undo a later STOP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_start_replayed_under_new_tokens_is_one_event_and_cannot_undo_a_stop() {
    let app = TestApp::spawn().await;
    let bridge = app.start_bridge().await;
    let normalize = app.start_stage("normalize");
    let consent = app.start_stage("consent");
    let phone = "+14155550177";
    let start_sid = "SMreplay000000000000000000000start";
    assert_eq!(
        post_inbound(&bridge, start_sid, phone, "START", "tok-a").await,
        200
    );
    app.wait_for_count(
        &format!("SELECT count(*) FROM consent_events WHERE phone_number = '{phone}'"),
        1,
        Duration::from_secs(60),
    )
    .await;
    let stop_sid = "SMreplay0000000000000000000000stop";
    assert_eq!(
        post_inbound(&bridge, stop_sid, phone, "STOP", "tok-b").await,
        200
    );
    app.wait_for_count(
        &format!(
            "SELECT count(*) FROM users WHERE phone_e164 = '{phone}' AND consent_state = 'OPT_OUT'"
        ),
        1,
        Duration::from_secs(60),
    )
    .await;
    // The attacker replays the captured START, each time with a fresh token.
    for token in ["tok-c", "tok-d", "tok-e"] {
        assert_eq!(
            post_inbound(&bridge, start_sid, phone, "START", token).await,
            200
        );
    }
    app.wait_caught_up("normalize", Duration::from_secs(60))
        .await;
    app.wait_caught_up("consent", Duration::from_secs(60)).await;
    let c = app.pool.get().await.unwrap();
    let inbound: i64 = c
        .query_one(
            "SELECT count(*) FROM inbound_events WHERE message_sid = $1",
            &[&start_sid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(inbound, 1, "one START event, however many tokens");
    let row = c
        .query_one(
            "SELECT consent_state, (SELECT count(*) FROM consent_events WHERE phone_number = $1) FROM users WHERE phone_e164 = $1",
            &[&phone],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "OPT_OUT", "the STOP stands");
    assert_eq!(row.get::<_, i64>(1), 2, "START once, STOP once");
    normalize.stop().await;
    consent.stop().await;
}

/// Stop as people write it, through the bridge, signed: every one opts out,
/// and an ordinary message that mentions a keyword does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_as_people_write_it_opts_out_through_the_bridge() {
    let app = TestApp::spawn().await;
    let bridge = app.start_bridge().await;
    let normalize = app.start_stage("normalize");
    let consent = app.start_stage("consent");
    let bodies = [
        "ＳＴＯＰ",
        "STOP！",
        "\"STOP\"",
        "stop\u{200B}",
        "\u{FEFF}Stop\u{200D}",
        "opt out",
        "Opt-Out",
        "STOP ALL",
        "quit 🛑",
        "*unsubscribe*",
        "please stop texting me",
        "revoke。",
        "end…",
    ];
    let ordinary = "I'll stop by tomorrow to pick it up";
    let phone = |i: usize| format!("+1415555{:04}", 3000 + i);
    let c = app.pool.get().await.unwrap();
    for i in 0..=bodies.len() {
        c.execute(
            "INSERT INTO users (phone_e164, consent_state) VALUES ($1, 'OPT_IN')",
            &[&phone(i)],
        )
        .await
        .unwrap();
    }
    for (i, body) in bodies.iter().chain([&ordinary]).enumerate() {
        let sid = format!("SMunicode{i:025}");
        assert_eq!(
            post_inbound(&bridge, &sid, &phone(i), body, &format!("tok-{i}")).await,
            200,
            "{body:?}"
        );
    }
    app.wait_for_count(
        "SELECT count(*) FROM inbound_events WHERE processing_status = 'PROCESSED'",
        bodies.len() as i64 + 1,
        Duration::from_secs(60),
    )
    .await;
    for (i, body) in bodies.iter().enumerate() {
        let state: String = c
            .query_one(
                "SELECT consent_state FROM users WHERE phone_e164 = $1",
                &[&phone(i)],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(state, "OPT_OUT", "{body:?} opts out");
    }
    let state: String = c
        .query_one(
            "SELECT consent_state FROM users WHERE phone_e164 = $1",
            &[&phone(bodies.len())],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "OPT_IN", "{ordinary:?} changes nothing");
    normalize.stop().await;
    consent.stop().await;
}
