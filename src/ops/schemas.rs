//! `ese schemas check`: whether the schemas in `schemas/` may be written to
//! the topics the registry already knows — Confluent's BACKWARD rule: a
//! reader with the new schema reads what the registered one wrote.

use serde_json::json;

use crate::config::Settings;
use crate::records::Kind;

/// One subject's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Compatible,
    /// Nothing registered under the subject yet.
    New,
    Incompatible(String),
}

/// Checks every subject `<topic>-value` of a topic the engine writes against
/// the registry; the verdicts, by subject.
pub async fn check(settings: &Settings) -> anyhow::Result<Vec<(String, Verdict)>> {
    let registry = &settings.schema_registry;
    let url = registry.url.trim().trim_end_matches('/');
    if url.is_empty() {
        anyhow::bail!(
            "schema-registry.url is not set: there is no registry to check the schemas against"
        );
    }
    let http = crate::http::client_builder().build()?;
    let password = std::env::var(crate::codec::REGISTRY_PASSWORD_ENV).ok();
    let mut out = Vec::new();
    for (key, topic) in &settings.topics {
        let Some(kind) = Kind::of_topic(key) else {
            continue;
        };
        let subject = format!("{topic}-value");
        let auth = |req: reqwest::RequestBuilder| {
            if registry.username.is_empty() {
                req
            } else {
                req.basic_auth(&registry.username, password.as_deref())
            }
        };
        // Some registries (Apicurio) call a schema compatible with a subject
        // that does not exist; ask whether it exists first.
        let latest = auth(http.get(format!("{url}/subjects/{subject}/versions/latest")))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("schema registry at {url}: {e}"))?;
        if latest.status() == reqwest::StatusCode::NOT_FOUND {
            out.push((subject, Verdict::New));
            continue;
        }
        let req = http
            .post(format!(
                "{url}/compatibility/subjects/{subject}/versions/latest?verbose=true"
            ))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .json(&json!({"schema": kind.current(), "schemaType": "AVRO"}));
        let resp = auth(req)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("schema registry at {url}: {e}"))?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let verdict = match status.as_u16() {
            200 if body["is_compatible"] == true => Verdict::Compatible,
            200 => Verdict::Incompatible(
                body["messages"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| "not BACKWARD compatible".to_string()),
            ),
            404 => Verdict::New,
            401 | 403 => anyhow::bail!(
                "schema registry at {url} refused the credentials ({status}): check schema-registry.username and SCHEMA_REGISTRY_PASSWORD"
            ),
            _ => anyhow::bail!("schema registry at {url}: {subject}: {status}: {body}"),
        };
        out.push((subject, verdict));
    }
    Ok(out)
}

/// Prints each subject's verdict; an error (non-zero exit) when any is incompatible.
pub async fn check_command(settings: &Settings) -> anyhow::Result<()> {
    let verdicts = check(settings).await?;
    let mut bad = 0;
    for (subject, v) in &verdicts {
        match v {
            Verdict::Compatible => println!("compatible    {subject}"),
            Verdict::New => println!("new           {subject} (nothing registered yet)"),
            Verdict::Incompatible(why) => {
                bad += 1;
                println!("INCOMPATIBLE  {subject}: {why}");
            }
        }
    }
    if bad > 0 {
        anyhow::bail!(
            "{bad} of {} subjects are not BACKWARD compatible with schemas/",
            verdicts.len()
        );
    }
    println!("{} subjects: schemas/ is compatible", verdicts.len());
    Ok(())
}
