//! Campaigns: the admin API, the segment DSL against real users, the state
//! machine and its commands, the scheduler, and the fan-out (resumable after
//! SIGKILL, pausable, never duplicating).

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{RunningApi, TestApp, kill9};

/// A template, a segment and a DRAFT campaign over them; returns the campaign id.
async fn campaign(api: &RunningApi, name: &str, body: &str, filter: Value) -> uuid::Uuid {
    let t = api
        .expect(
            201,
            "POST",
            "/api/v1/templates",
            Some(json!({"name": format!("{name}-t"), "content": body})),
        )
        .await;
    let s = api
        .expect(
            201,
            "POST",
            "/api/v1/segments",
            Some(json!({"name": format!("{name}-s"), "filter_criteria": filter})),
        )
        .await;
    let c = api
        .expect(
            201,
            "POST",
            "/api/v1/campaigns",
            Some(json!({"name": name, "template_id": t["id"], "segment_id": s["id"]})),
        )
        .await;
    assert_eq!(c["status"], "DRAFT");
    crate::harness::id_of(&c)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_operator_and_nesting_selects_the_right_users() {
    let app = TestApp::spawn().await;
    let api = app.start_api().await;
    let huge = "k".repeat(20_000);
    let people = [
        json!({"country": "US", "age": 30, "tags": ["vip", "beta"], "name": "Alice", "signup": "2024-01-15"}),
        json!({"country": "GB", "age": 17, "tags": ["beta"], "name": "Bob", "signup": "2023-06-01T10:00:00Z"}),
        json!({"country": "US", "age": 45.5, "name": "Carol Ann", "signup": "not a date"}),
        json!({"country": "DE", "age": "30", "name": "dave"}),
        json!({}),
        // Opted out: never in any audience, whatever the filter.
        json!({"country": "US", "age": 30, "tags": ["vip"], "name": "Alice"}),
        json!({"'); DROP TABLE users; --": "x'y\"z", "名前": "太郎", "country": "FR", huge.clone(): 1}),
    ];
    let c = app.pool.get().await.unwrap();
    for (i, attrs) in people.iter().enumerate() {
        let phone = format!("+1415555000{}", i + 1);
        let consent = if i == 5 { "OPT_OUT" } else { "OPT_IN" };
        c.execute(
            "INSERT INTO users (phone_e164, attributes, consent_state) VALUES ($1, $2, $3)",
            &[&phone, attrs, &consent],
        )
        .await
        .unwrap();
    }
    let leaf = |a: &str, op: &str, v: Value| json!({"attribute": a, "operator": op, "value": v});
    let cases: Vec<(&str, Value, Vec<u8>)> = vec![
        ("equals", leaf("country", "equals", json!("US")), vec![1, 3]),
        (
            "not_equals",
            leaf("country", "not_equals", json!("US")),
            vec![2, 4, 7],
        ),
        (
            "in",
            leaf("country", "in", json!(["US", "GB"])),
            vec![1, 2, 3],
        ),
        (
            "not_in",
            leaf("country", "not_in", json!(["US"])),
            vec![2, 4, 7],
        ),
        (
            "contains text",
            leaf("name", "contains", json!("Ann")),
            vec![3],
        ),
        (
            "contains array",
            leaf("tags", "contains", json!("vip")),
            vec![1],
        ),
        (
            "starts_with",
            leaf("name", "starts_with", json!("Al")),
            vec![1],
        ),
        ("gt", leaf("age", "gt", json!(29)), vec![1, 3]),
        ("gte", leaf("age", "gte", json!(30)), vec![1, 3]),
        ("lt", leaf("age", "lt", json!(30)), vec![2]),
        ("lte", leaf("age", "lte", json!(30)), vec![1, 2]),
        (
            "before",
            leaf("signup", "before", json!("2024-01-01")),
            vec![2],
        ),
        (
            "after",
            leaf("signup", "after", json!("2024-01-01T00:00:00Z")),
            vec![1],
        ),
        (
            "exists",
            json!({"attribute": "tags", "operator": "exists"}),
            vec![1, 2],
        ),
        (
            "not_exists",
            json!({"attribute": "tags", "operator": "not_exists"}),
            vec![3, 4, 5, 7],
        ),
        (
            "AND",
            json!({"operator": "AND", "conditions": [leaf("country", "equals", json!("US")), leaf("age", "gt", json!(40))]}),
            vec![3],
        ),
        (
            "OR",
            json!({"operator": "OR", "conditions": [leaf("country", "equals", json!("GB")), leaf("country", "equals", json!("DE"))]}),
            vec![2, 4],
        ),
        (
            "NOT",
            json!({"operator": "NOT", "conditions": [leaf("country", "equals", json!("US"))]}),
            vec![2, 4, 5, 7],
        ),
        (
            "nested",
            json!({"operator": "or", "conditions": [
                {"operator": "AND", "conditions": [
                    leaf("country", "equals", json!("US")),
                    {"operator": "NOT", "conditions": [{"attribute": "tags", "operator": "exists"}]}
                ]},
                leaf("name", "equals", json!("Bob"))
            ]}),
            vec![2, 3],
        ),
        (
            "hostile name",
            leaf("'); DROP TABLE users; --", "equals", json!("x'y\"z")),
            vec![7],
        ),
        ("unicode", leaf("名前", "equals", json!("太郎")), vec![7]),
        ("huge name", leaf(&huge, "equals", json!(1)), vec![7]),
        (
            "hostile value",
            leaf("country", "equals", json!("US'; DELETE FROM users; --")),
            vec![],
        ),
    ];
    for (i, (what, filter, expected)) in cases.into_iter().enumerate() {
        let s = api
            .expect(
                201,
                "POST",
                "/api/v1/segments",
                Some(json!({"name": format!("case {i}"), "filter_criteria": filter})),
            )
            .await;
        let id = crate::harness::id_of(&s);
        let preview = api
            .expect(
                200,
                "GET",
                &format!("/api/v1/segments/{id}/preview?limit=100"),
                None,
            )
            .await;
        let got: Vec<u8> = preview["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                let p = u["phone_e164"].as_str().unwrap();
                p[p.len() - 1..].parse().unwrap()
            })
            .collect();
        assert_eq!(got, expected, "{what}");
        let est = api
            .expect(200, "GET", &format!("/api/v1/segments/{id}/estimate"), None)
            .await;
        assert_eq!(est["estimated_audience_size"], expected.len(), "{what}");
        let stored = app
            .count(&format!(
                "SELECT estimated_audience_size::bigint FROM segments WHERE id = '{id}'"
            ))
            .await;
        assert_eq!(stored, expected.len() as i64, "{what}");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM users").await,
        7,
        "users intact"
    );

    // Validation points at the bad node.
    let (status, err) = api
        .call(
            "POST",
            "/api/v1/segments",
            Some(
                json!({"name": "bad", "filter_criteria": {"operator": "AND", "conditions": [
                leaf("age", "gt", json!(1)), leaf("age", "gt", json!("old"))]}}),
            ),
        )
        .await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(
        err["error"]["field"], "/filter_criteria/conditions/1/value",
        "{err}"
    );
    let mut deep = leaf("a", "exists", Value::Null);
    for _ in 0..app.settings.campaigns.max_filter_depth {
        deep = json!({"operator": "NOT", "conditions": [deep]});
    }
    let (status, err) = api
        .call(
            "POST",
            "/api/v1/segments",
            Some(json!({"name": "deep", "filter_criteria": deep})),
        )
        .await;
    assert_eq!(status, 422, "{err}");
    assert!(
        err["error"]["field"]
            .as_str()
            .unwrap()
            .starts_with("/filter_criteria/conditions/0"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_are_checked_rendered_and_protected_while_used() {
    let app = TestApp::spawn().await;
    let api = app.start_api().await;
    let t = api
        .expect(
            201,
            "POST",
            "/api/v1/templates",
            Some(json!({"name": "promo", "content": "Hi {first_name}, {{sale}} ends {day}. {first_name}!",
                        "defaults": {"day": "Friday"}})),
        )
        .await;
    assert_eq!(t["variables"], json!(["first_name", "day"]));
    let id = crate::harness::id_of(&t);

    let (status, err) = api
        .call(
            "POST",
            "/api/v1/templates",
            Some(json!({"name": "bad", "content": "Hi {first name}"})),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["field"], "/content");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("character 9"),
        "{err}"
    );

    let r = api
        .expect(
            200,
            "POST",
            &format!("/api/v1/templates/{id}/render"),
            Some(json!({"variables": {"first_name": "Zoé"}})),
        )
        .await;
    assert_eq!(r["rendered_content"], "Hi Zoé, {sale} ends Friday. Zoé!");
    assert_eq!(r["length"]["encoding"], "GSM-7");
    assert_eq!(r["length"]["segments"], 1);
    let (status, err) = api
        .call(
            "POST",
            &format!("/api/v1/templates/{id}/render"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["field"], "/variables/first_name");

    let long = api
        .expect(
            201,
            "POST",
            "/api/v1/templates",
            Some(json!({"name": "long", "content": "a".repeat(161)})),
        )
        .await;
    assert_eq!(long["length"]["segments"], 2);
    let emoji = api
        .expect(
            201,
            "POST",
            "/api/v1/templates",
            Some(json!({"name": "emoji", "content": "Sale 🎉"})),
        )
        .await;
    assert_eq!(emoji["length"]["encoding"], "UCS-2");

    // In use by an active campaign: no delete, no update.
    let s = api
        .expect(
            201,
            "POST",
            "/api/v1/segments",
            Some(json!({"name": "all", "filter_criteria": {"attribute": "x", "operator": "not_exists"}})),
        )
        .await;
    let c = api
        .expect(
            201,
            "POST",
            "/api/v1/campaigns",
            Some(json!({"name": "c", "template_id": id, "segment_id": s["id"]})),
        )
        .await;
    api.expect(
        200,
        "POST",
        &format!("/api/v1/campaigns/{}/ready", crate::harness::id_of(&c)),
        None,
    )
    .await;
    let (status, err) = api
        .call("DELETE", &format!("/api/v1/templates/{id}"), None)
        .await;
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"]["code"], "in_use");
    let (status, _) = api
        .call(
            "PUT",
            &format!("/api/v1/templates/{id}"),
            Some(json!({"name": "promo", "content": "changed"})),
        )
        .await;
    assert_eq!(status, 409);
    let unused = crate::harness::id_of(&long);
    api.expect(204, "DELETE", &format!("/api/v1/templates/{unused}"), None)
        .await;
    api.expect(404, "GET", &format!("/api/v1/templates/{unused}"), None)
        .await;

    // Bad campaign input names the field.
    let (status, err) = api
        .call(
            "POST",
            "/api/v1/campaigns",
            Some(json!({"name": "q", "template_id": id, "segment_id": s["id"], "quiet_hours_start": "21:00"})),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["field"], "/quiet_hours_end");
    let (status, err) = api
        .call(
            "POST",
            "/api/v1/campaigns",
            Some(json!({"name": "q", "template_id": "0199a5b0-0000-7000-8000-000000000009", "segment_id": s["id"]})),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["field"], "/template_id");
}

/// The checked-in document, written by `ESE_WRITE_OPENAPI=1` runs of
/// [`every_route_needs_the_token_and_is_documented`].
const OPENAPI_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/schemas/admin-api.openapi.json"
);

#[tokio::test(flavor = "multi_thread")]
async fn every_route_needs_the_token_and_is_documented() {
    let app = TestApp::spawn().await;
    let api = app.start_api().await;
    let resp = api
        .http
        .get(format!("{}/api/v1/openapi.json", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let served = resp.text().await.unwrap();
    // Generated from the handlers' types, never edited by hand.
    let generated = ese::campaigns::api::openapi_json();
    assert!(
        served == generated,
        "the served document is not ese::campaigns::api::openapi_json() (is \
         campaigns.max-filter-depth still {} in config/default.toml?)",
        ese::campaigns::api::DEFAULT_MAX_FILTER_DEPTH
    );
    if std::env::var_os("ESE_WRITE_OPENAPI").is_some() {
        std::fs::write(OPENAPI_FILE, &generated).unwrap();
        eprintln!("wrote {OPENAPI_FILE}");
    } else {
        let checked_in = std::fs::read_to_string(OPENAPI_FILE).unwrap_or_default();
        assert!(
            checked_in == generated,
            "schemas/admin-api.openapi.json is not the document the code generates; \
             write it with\n\n  ESE_WRITE_OPENAPI=1 cargo test --test it -- \
             campaigns::every_route_needs_the_token_and_is_documented\n\nand commit it"
        );
    }
    let doc: Value = serde_json::from_str(&generated).unwrap();
    for (method, path) in ese::campaigns::api::ROUTES {
        assert!(
            doc["paths"][path][method.to_lowercase()].is_object(),
            "{method} {path} is not in the OpenAPI document"
        );
        let url = format!(
            "{}{}",
            api.base,
            path.replace("{id}", "1").replace("{action}", "start")
        );
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        for token in [None, Some("wrong"), Some("")] {
            let mut req = api.http.request(m.clone(), &url).json(&json!({}));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 401, "{method} {path} with {token:?}");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized");
        }
    }
    // And with it, the routes answer (an empty list here).
    let list = api.expect(200, "GET", "/api/v1/campaigns", None).await;
    assert_eq!(list["items"], json!([]));
    // The scheme's case does not matter.
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let resp = api
            .http
            .get(format!("{}/api/v1/campaigns", api.base))
            .header(
                "authorization",
                format!("{scheme} {}", crate::harness::ADMIN_TOKEN),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "scheme {scheme:?}");
    }

    // What does not parse is the documented JSON error, not axum's text.
    let raw = |method: reqwest::Method, path: &str, body: &'static str| {
        api.http
            .request(method, format!("{}{path}", api.base))
            .bearer_auth(crate::harness::ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (method, path, body, code) in [
        (
            reqwest::Method::GET,
            "/api/v1/templates/abc",
            "",
            "invalid_path",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/segments/99999999999999999999/preview",
            "",
            "invalid_path",
        ),
        (
            reqwest::Method::POST,
            "/api/v1/campaigns/x1/start",
            "",
            "invalid_path",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/templates?limit=ten",
            "",
            "invalid_query",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/campaigns?status=LAUNCHED",
            "",
            "invalid_query",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/segments?colour=red",
            "",
            "invalid_query",
        ),
        (
            reqwest::Method::POST,
            "/api/v1/templates",
            "{\"name\": ",
            "invalid_json",
        ),
        (
            reqwest::Method::POST,
            "/api/v1/segments",
            "[]",
            "invalid_json",
        ),
        (
            reqwest::Method::PUT,
            "/api/v1/templates/0199a5b0-0000-7000-8000-000000000001",
            "",
            "invalid_json",
        ),
        // serde alone would read a struct from its fields in order.
        (
            reqwest::Method::POST,
            "/api/v1/templates",
            "[\"t\", \"Hi\"]",
            "invalid_json",
        ),
        (
            reqwest::Method::POST,
            "/api/v1/templates/0199a5b0-0000-7000-8000-000000000001/render",
            "[]",
            "invalid_json",
        ),
    ] {
        let resp = raw(method.clone(), path, body).await.unwrap();
        assert_eq!(resp.status(), 400, "{method} {path}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/json",
            "{method} {path}"
        );
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], code, "{method} {path}: {err}");
    }
    // JSON Schema integers may be written 2.0; names must not be blank.
    let t = api
        .expect(
            201,
            "POST",
            "/api/v1/templates",
            Some(json!({"name": "t", "content": "Hi"})),
        )
        .await;
    let s = api
        .expect(
            201,
            "POST",
            "/api/v1/segments",
            Some(json!({"name": "s", "filter_criteria": {"attribute": "x", "operator": "exists"}})),
        )
        .await;
    api.expect(
        201,
        "POST",
        "/api/v1/campaigns",
        Some(
            json!({"name": "c", "template_id": t["id"], "segment_id": s["id"],
                    "rate_limit_per_second": 5.0}),
        ),
    )
    .await;
    let (status, err) = api
        .call(
            "POST",
            "/api/v1/templates",
            Some(json!({"name": " \u{3000}\t", "content": "Hi"})),
        )
        .await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["field"], "/name");
}

/// Schemathesis (`scripts/schemathesis`, from PyPI) with all its checks
/// against the served document finds nothing: every schema-valid request
/// is accepted, every invalid one refused with the documented error, and
/// every answer matches the document.
#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_with_all_checks_finds_nothing() {
    let app = TestApp::spawn().await;
    let api = app.start_api().await;
    let base = api.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/schemathesis"))
            .arg(&base)
            .env("ESE_ADMIN_TOKEN", crate::harness::ADMIN_TOKEN)
            .stdin(std::process::Stdio::null())
            .output()
    })
    .await
    .unwrap()
    .expect("run scripts/schemathesis");
    if !out.status.success() {
        let report = String::from_utf8_lossy(&out.stdout);
        // What was found (schemathesis's ERRORS and FAILURES sections, or
        // the end of its report) is kept where scripts/test prints it last,
        // so a CI log cut in the middle still shows it.
        let start = ["ERRORS", "FAILURES"]
            .iter()
            .filter_map(|s| report.find(s))
            .min()
            .unwrap_or(report.len().saturating_sub(3000));
        let found = &report[report.floor_char_boundary(start)..];
        let found = found.find("SUMMARY").map_or(found, |end| &found[..end]);
        let found: String = found.chars().take(3000).collect();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = &stderr[stderr.floor_char_boundary(stderr.len().saturating_sub(800))..];
        crate::harness::keep_report("schemathesis", &format!("{found}\n{stderr}"));
        panic!(
            "scripts/schemathesis {} found problems ({}):\n{report}\n{stderr}",
            api.base, out.status
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn illegal_transitions_are_409_and_legal_ones_publish_a_command() {
    let app = TestApp::spawn().await;
    let api = app.start_api().await;
    let base = campaign(
        &api,
        "base",
        "Hello",
        json!({"attribute": "x", "operator": "exists"}),
    )
    .await;
    let legal: &[(&str, &str, &str)] = &[
        ("DRAFT", "ready", "READY"),
        ("DRAFT", "pause", "PAUSED"),
        ("DRAFT", "cancel", "CANCELLED"),
        ("READY", "start", "RUNNING"),
        ("READY", "pause", "PAUSED"),
        ("READY", "cancel", "CANCELLED"),
        ("RUNNING", "pause", "PAUSED"),
        ("RUNNING", "cancel", "CANCELLED"),
        ("PAUSED", "resume", "RUNNING"),
        ("PAUSED", "cancel", "CANCELLED"),
    ];
    let c = app.pool.get().await.unwrap();
    let mut published = Vec::new();
    for from in [
        "DRAFT",
        "READY",
        "RUNNING",
        "PAUSED",
        "COMPLETED",
        "CANCELLED",
    ] {
        for action in ["ready", "start", "pause", "resume", "cancel"] {
            let id: uuid::Uuid = c
                .query_one(
                    "INSERT INTO campaigns (name, template_id, segment_id, status, paused_from, schedule_time)
                     SELECT $1, template_id, segment_id, $2, CASE WHEN $2 = 'PAUSED' THEN 'RUNNING' END,
                            now() + interval '1 day'
                       FROM campaigns WHERE id = $3 RETURNING id",
                    &[&format!("{from}-{action}"), &from, &base],
                )
                .await
                .unwrap()
                .get(0);
            let (status, body) = api
                .call("POST", &format!("/api/v1/campaigns/{id}/{action}"), None)
                .await;
            match legal.iter().find(|(f, a, _)| *f == from && *a == action) {
                Some((_, _, to)) => {
                    assert_eq!(status, 200, "{from} {action}: {body}");
                    assert_eq!(body["status"], *to, "{from} {action}");
                    published.push((id, action.to_string(), to.to_string()));
                }
                None => {
                    assert_eq!(status, 409, "{from} {action}: {body}");
                    assert_eq!(body["error"]["code"], "illegal_transition");
                    let msg = body["error"]["message"].as_str().unwrap();
                    assert!(msg.contains("allowed"), "{msg}");
                    let stored: String = c
                        .query_one("SELECT status FROM campaigns WHERE id = $1", &[&id])
                        .await
                        .unwrap()
                        .get(0);
                    assert_eq!(stored, from, "an illegal transition changed nothing");
                }
            }
        }
    }
    // Resume returns to where the campaign was paused from (a scheduled
    // campaign: without a schedule_time, READY starts at once).
    c.execute(
        "UPDATE campaigns SET schedule_time = now() + interval '1 day' WHERE id = $1",
        &[&base],
    )
    .await
    .unwrap();
    api.expect(
        200,
        "POST",
        &format!("/api/v1/campaigns/{base}/ready"),
        None,
    )
    .await;
    api.expect(
        200,
        "POST",
        &format!("/api/v1/campaigns/{base}/pause"),
        None,
    )
    .await;
    let back = api
        .expect(
            200,
            "POST",
            &format!("/api/v1/campaigns/{base}/resume"),
            None,
        )
        .await;
    assert_eq!(back["status"], "READY");
    api.expect(
        404,
        "POST",
        "/api/v1/campaigns/0199a5b0-0000-7000-8000-000000000009/start",
        None,
    )
    .await;
    api.expect(
        404,
        "POST",
        &format!("/api/v1/campaigns/{base}/launch"),
        None,
    )
    .await;

    // schedule_time NULL means immediate: ready starts it, with both commands.
    let now: uuid::Uuid = c
        .query_one(
            "INSERT INTO campaigns (name, template_id, segment_id)
             SELECT 'immediate', template_id, segment_id FROM campaigns WHERE id = $1 RETURNING id",
            &[&base],
        )
        .await
        .unwrap()
        .get(0);
    let started = api
        .expect(200, "POST", &format!("/api/v1/campaigns/{now}/ready"), None)
        .await;
    assert_eq!(started["status"], "RUNNING", "{started}");
    published.push((now, "ready".into(), "READY".into()));
    published.push((now, "start".into(), "RUNNING".into()));

    let expected = published.len() + 3;
    let commands = app.commands(expected + 1, Duration::from_secs(5)).await;
    assert_eq!(commands.len(), expected, "one command per legal transition");
    for (id, action, to) in &published {
        assert!(
            commands
                .iter()
                .any(|c| c.campaign_id == *id && &c.command == action && &c.status == to),
            "no command for campaign {id} {action}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduler_starts_each_due_campaign_once_even_when_two_run() {
    let app = TestApp::spawn().await;
    let api = app.start_api().await;
    let base = campaign(
        &api,
        "base",
        "Hello",
        json!({"attribute": "x", "operator": "exists"}),
    )
    .await;
    let c = app.pool.get().await.unwrap();
    c.execute(
        "INSERT INTO campaigns (name, template_id, segment_id, status, schedule_time)
         SELECT 'due ' || i, template_id, segment_id, 'READY', now() - interval '1 minute'
           FROM campaigns, generate_series(1, 20) i WHERE id = $1",
        &[&base],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO campaigns (name, template_id, segment_id, status, schedule_time)
         SELECT 'later', template_id, segment_id, 'READY', now() + interval '1 hour'
           FROM campaigns WHERE id = $1",
        &[&base],
    )
    .await
    .unwrap();
    let commands = ese::campaigns::Commands::new(&app.deps()).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (pool, commands) = (app.pool.clone(), commands.clone());
        tasks.push(tokio::spawn(async move {
            let mut started = 0;
            for _ in 0..5 {
                started += ese::campaigns::scheduler::tick(&pool, &commands)
                    .await
                    .unwrap()
                    .0;
            }
            started
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 20);
    assert_eq!(
        app.count("SELECT count(*) FROM campaigns WHERE status = 'RUNNING'")
            .await,
        20
    );
    assert_eq!(
        app.count("SELECT count(*) FROM campaigns WHERE status = 'READY'")
            .await,
        1
    );
    let published = app.commands(21, Duration::from_secs(5)).await;
    assert_eq!(published.len(), 20);
    let ids: HashSet<uuid::Uuid> = published.iter().map(|c| c.campaign_id).collect();
    assert_eq!(ids.len(), 20, "one start per campaign");
    assert!(
        published
            .iter()
            .all(|c| c.command == "start" && c.issued_by == "scheduler")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fanout_pauses_resumes_skips_missing_variables_and_completes() {
    let app =
        TestApp::spawn_with(toml::from_str("[campaigns]\nfanout-page-size = 7").unwrap()).await;
    let api = app.start_api().await;
    // 50 users: every 5th has no first_name; users 41-50 opted out.
    app.seed_users(
        50,
        "CASE WHEN i % 5 = 0 THEN '{\"plan\": \"pro\"}'::jsonb
              ELSE jsonb_build_object('plan', 'pro', 'first_name', 'U' || i) END",
    )
    .await;
    let c = app.pool.get().await.unwrap();
    c.execute(
        "UPDATE users SET consent_state = 'OPT_OUT' WHERE seq > 40",
        &[],
    )
    .await
    .unwrap();
    let id = campaign(
        &api,
        "spring",
        "Hi {first_name}",
        json!({"attribute": "plan", "operator": "equals", "value": "pro"}),
    )
    .await;
    // Without a schedule_time, ready starts it at once.
    api.expect(200, "POST", &format!("/api/v1/campaigns/{id}/ready"), None)
        .await;
    api.expect(200, "POST", &format!("/api/v1/campaigns/{id}/pause"), None)
        .await;

    let fanout = app.start_stage("fanout");
    app.wait_caught_up("fanout", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        app.count("SELECT count(*) FROM messages").await,
        0,
        "paused: nothing fans out"
    );

    api.expect(200, "POST", &format!("/api/v1/campaigns/{id}/resume"), None)
        .await;
    app.wait_for_count(
        "SELECT count(*) FROM fanout_progress WHERE finished",
        1,
        Duration::from_secs(30),
    )
    .await;
    // 40 opted in, 8 of them without first_name → 32 messages, 8 skipped.
    assert_eq!(
        app.count("SELECT count(*) FROM messages WHERE status = 'QUEUED'")
            .await,
        32
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM messages WHERE rendered_content = 'Hi U' || (substr(recipient_phone, 6)::int - 2000000)"
        )
        .await,
        32,
        "every body rendered from its user's attributes"
    );
    let got = api
        .expect(200, "GET", &format!("/api/v1/campaigns/{id}"), None)
        .await;
    assert_eq!(got["counts"]["QUEUED"], 32);
    assert_eq!(got["fanout"]["skipped"], 8);
    assert_eq!(
        got["fanout"]["skipped_reasons"]["missing variable first_name"],
        8
    );

    let sends = app.read_topic(&app.topic("sends"), 33, Duration::from_secs(5));
    assert_eq!(sends.len(), 32);
    let mut seen = HashSet::new();
    for r in &sends {
        let s: ese::records::SendRequest = app
            .codec
            .decode(r.payload.as_deref().unwrap())
            .await
            .unwrap();
        assert_eq!(s.campaign_id, Some(id));
        assert_eq!(
            r.key.as_deref(),
            Some(s.recipient.as_bytes()),
            "keyed by recipient"
        );
        assert!(seen.insert(s.message_id));
    }

    // Completed once every message is final.
    let commands = ese::campaigns::Commands::new(&app.deps()).unwrap();
    let (_, completed) = ese::campaigns::scheduler::tick(&app.pool, &commands)
        .await
        .unwrap();
    assert_eq!(completed, 0, "messages still queued");
    c.execute("UPDATE messages SET status = 'FAILED'", &[])
        .await
        .unwrap();
    let (_, completed) = ese::campaigns::scheduler::tick(&app.pool, &commands)
        .await
        .unwrap();
    assert_eq!(completed, 1);
    let got = api
        .expect(200, "GET", &format!("/api/v1/campaigns/{id}"), None)
        .await;
    assert_eq!(got["status"], "COMPLETED");
    fanout.stop().await;
}

/// A sparse audience spread over far more users than a page: every member
/// gets exactly one message and one send record, across windows of users
/// with nobody in them and a cluster that fills several pages.
#[tokio::test(flavor = "multi_thread")]
async fn fanout_walks_a_sparse_audience_across_empty_windows() {
    let app =
        TestApp::spawn_with(toml::from_str("[campaigns]\nfanout-page-size = 3").unwrap()).await;
    let api = app.start_api().await;
    // 400 users; the audience is every 90th (90, 180, 270, 360) and a run
    // of ten (201-210): 14 people, with stretches of 89 users between.
    app.seed_users(
        400,
        "CASE WHEN i % 90 = 0 OR i BETWEEN 201 AND 210 THEN '{\"plan\": \"rare\"}'::jsonb
              ELSE '{\"plan\": \"basic\"}'::jsonb END",
    )
    .await;
    let id = campaign(
        &api,
        "sparse",
        "Hi",
        json!({"attribute": "plan", "operator": "equals", "value": "rare"}),
    )
    .await;
    api.expect(200, "POST", &format!("/api/v1/campaigns/{id}/ready"), None)
        .await;
    let fanout = app.start_stage("fanout");
    app.wait_for_count(
        "SELECT count(*) FROM fanout_progress WHERE finished",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        app.count(
            "SELECT count(DISTINCT m.recipient_phone) FROM messages m
               JOIN users u ON u.phone_e164 = m.recipient_phone
              WHERE u.attributes->>'plan' = 'rare'"
        )
        .await,
        14,
        "every member of the audience has a message"
    );
    assert_eq!(app.count("SELECT count(*) FROM messages").await, 14);
    let sends = app.read_topic(&app.topic("sends"), 15, Duration::from_secs(5));
    let ids: HashSet<Vec<u8>> = sends.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(sends.len(), 14, "one send record each");
    assert_eq!(ids.len(), 14, "to 14 different people");
    let got = api
        .expect(200, "GET", &format!("/api/v1/campaigns/{id}"), None)
        .await;
    assert_eq!(got["fanout"]["messages_created"], 14);
    fanout.stop().await;
}

/// A running campaign whose stored segment no longer parses (written by
/// hand) fails alone: a newer campaign still fans out, and the broken one
/// gets no messages.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_campaign_does_not_hold_up_the_fanout_of_the_others() {
    let app = TestApp::spawn().await;
    let api = app.start_api().await;
    app.seed_users(10, "'{\"plan\": \"pro\"}'::jsonb").await;
    let filter = json!({"attribute": "plan", "operator": "equals", "value": "pro"});
    let broken = campaign(&api, "broken", "Hi", filter.clone()).await;
    let fine = campaign(&api, "fine", "Hello", filter).await;
    assert!(broken < fine, "the broken campaign comes first by id");
    for id in [broken, fine] {
        api.expect(200, "POST", &format!("/api/v1/campaigns/{id}/ready"), None)
            .await;
    }
    let c = app.pool.get().await.unwrap();
    c.execute(
        "UPDATE segments SET filter_criteria = '{}'
          WHERE id = (SELECT segment_id FROM campaigns WHERE id = $1)",
        &[&broken],
    )
    .await
    .unwrap();
    let fanout = app.start_stage("fanout");
    app.wait_for_count(
        &format!("SELECT count(*) FROM fanout_progress WHERE finished AND campaign_id = '{fine}'"),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM messages WHERE campaign_id = '{fine}'"
        ))
        .await,
        10
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM messages WHERE campaign_id = '{broken}'"
        ))
        .await,
        0
    );
    fanout.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fanout_killed_midway_resumes_with_exactly_one_message_and_send_each() {
    const USERS: i64 = 10_000;
    let app =
        TestApp::spawn_with(toml::from_str("[campaigns]\nfanout-page-size = 250").unwrap()).await;
    let api = app.start_api().await;
    app.seed_users(USERS, "jsonb_build_object('first_name', 'U' || i)")
        .await;
    let id = campaign(
        &api,
        "big",
        "Hello {first_name}",
        json!({"attribute": "first_name", "operator": "exists"}),
    )
    .await;
    let mut child = app.spawn_ese(&["run", "fanout"]);
    // Without a schedule_time, ready starts it at once.
    api.expect(200, "POST", &format!("/api/v1/campaigns/{id}/ready"), None)
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = app.count("SELECT count(*) FROM messages").await;
        if n >= 2_500 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fan-out did not start: {n} messages"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill9(&mut child);
    let at_kill = app.count("SELECT count(*) FROM messages").await;
    assert!(at_kill < USERS, "killed mid-way ({at_kill} messages)");

    let mut child = app.spawn_ese(&["run", "fanout"]);
    app.wait_for_count(
        "SELECT count(*) FROM fanout_progress WHERE finished",
        1,
        Duration::from_secs(120),
    )
    .await;
    kill9(&mut child);
    assert_eq!(app.count("SELECT count(*) FROM messages").await, USERS);
    assert_eq!(
        app.count("SELECT count(DISTINCT recipient_phone) FROM messages")
            .await,
        USERS
    );
    let sends = app.read_topic(
        &app.topic("sends"),
        USERS as usize + 1,
        Duration::from_secs(20),
    );
    assert_eq!(
        sends.len() as i64,
        USERS,
        "exactly one send record per recipient"
    );
    let mut ids = HashSet::new();
    for r in &sends {
        let s: ese::records::SendRequest = app
            .codec
            .decode(r.payload.as_deref().unwrap())
            .await
            .unwrap();
        ids.insert(s.message_id);
    }
    assert_eq!(ids.len() as i64, USERS);
}

/// The admin API bounds what it stores: a template body of at most 1,600
/// characters (the provider's limit for one message), at most 100
/// conditions per AND/OR; the document states both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_are_bounded_and_the_bounds_are_documented() {
    let app = TestApp::spawn().await;
    let api = app.start_api().await;
    let at_limit = "é".repeat(1600);
    api.expect(
        201,
        "POST",
        "/api/v1/templates",
        Some(json!({"name": "long", "content": at_limit})),
    )
    .await;
    let over = api
        .expect(
            422,
            "POST",
            "/api/v1/templates",
            Some(json!({"name": "too-long", "content": "é".repeat(1601)})),
        )
        .await;
    assert_eq!(over["error"]["field"], "/content", "{over}");
    let leaf = json!({"attribute": "city", "operator": "equals", "value": "Paris"});
    api.expect(
        201,
        "POST",
        "/api/v1/segments",
        Some(json!({"name": "wide", "filter_criteria": {"operator": "OR", "conditions": vec![leaf.clone(); 100]}})),
    )
    .await;
    let over = api
        .expect(
            422,
            "POST",
            "/api/v1/segments",
            Some(json!({"name": "too-wide", "filter_criteria": {"operator": "OR", "conditions": vec![leaf; 101]}})),
        )
        .await;
    assert_eq!(
        over["error"]["field"], "/filter_criteria/conditions",
        "{over}"
    );
    // A number PostgreSQL writes back as 309 digits reads back (it did not).
    let huge = api
        .expect(
            201,
            "POST",
            "/api/v1/segments",
            Some(json!({"name": "huge", "filter_criteria": {"attribute": "score", "operator": "lt", "value": f64::MAX}})),
        )
        .await;
    let got = api
        .expect(
            200,
            "GET",
            &format!("/api/v1/segments/{}", crate::harness::id_of(&huge)),
            None,
        )
        .await;
    assert_eq!(got["filter_criteria"]["value"], json!(f64::MAX));
    let doc = ese::campaigns::api::openapi_json();
    assert!(
        doc.contains("\"maxLength\": 1600"),
        "template body bound documented"
    );
    assert!(
        doc.contains("\"maxItems\": 100"),
        "conditions bound documented"
    );
}
