//! `ese healthcheck URL`: the container health probe, so the image needs no
//! curl or wget (docker-compose.yml runs it in every engine service).

use std::time::Duration;

/// GETs `url` and succeeds on a 2xx answer within `timeout`; otherwise the
/// error names the status, or why no answer came (refused, timed out, bad
/// URL). Needs no configuration: a probe must not fail on a config problem
/// the process it probes has already got past.
pub async fn healthcheck(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = crate::http::client_builder()
        .timeout(timeout)
        // The probe targets the process beside it; a proxy taken from the
        // environment is not on that path.
        .no_proxy()
        .build()
        .map_err(|e| anyhow::anyhow!("healthcheck: cannot build the HTTP client: {e}"))?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("healthcheck {url}: {}", describe(&e, timeout)))?;
    let status = response.status();
    if !status.is_success() {
        anyhow::bail!("healthcheck {url}: {status}");
    }
    Ok(())
}

/// Why a request got no answer, in a few words: the innermost cause (for
/// example "Connection refused (os error 111)"), not reqwest's whole chain.
fn describe(error: &reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!(
            "no answer within {}",
            humantime_serde::re::humantime::format_duration(timeout)
        );
    }
    let mut root: &dyn std::error::Error = error;
    while let Some(source) = root.source() {
        root = source;
    }
    if error.is_connect() {
        format!("cannot connect: {root}")
    } else if error.is_builder() {
        format!("invalid URL: {root}")
    } else {
        root.to_string()
    }
}
