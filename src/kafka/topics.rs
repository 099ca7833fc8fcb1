//! Topics as configured: created with their partitions, replication and
//! configs (`min.insync.replicas`, `cleanup.policy`, `retention.ms`), the
//! configs of existing topics brought in line, and every partition waited
//! for until it has a leader.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::{Client, ClientContext, DefaultClientContext};
use rdkafka::types::RDKafkaErrorCode;

use super::client_config;
use crate::config::KafkaConfig;

const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A config of an existing topic changed to what the settings ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChange {
    pub topic: String,
    pub name: &'static str,
    /// `None`: the topic did not have it set.
    pub was: Option<String>,
    pub now: String,
}

/// What [`ensure_topics`] did.
#[derive(Debug, Default)]
pub struct TopicsReport {
    /// Topics created now.
    pub created: Vec<String>,
    /// Configs of existing topics changed now.
    pub changed: Vec<ConfigChange>,
}

/// The configs a topic kept `retention` carries.
fn wanted(cfg: &KafkaConfig, retention: Duration) -> [(&'static str, String); 3] {
    [
        ("min.insync.replicas", cfg.min_insync_replicas.to_string()),
        ("cleanup.policy", "delete".to_string()),
        ("retention.ms", retention.as_millis().to_string()),
    ]
}

/// Creates each topic of `topics` (name → retention) that is missing, with
/// the configured partitions, replication and configs; sets the configs of
/// those that exist where they differ (partitions and replication of an
/// existing topic are left alone). Waits until every partition has a leader.
pub async fn ensure_topics(
    cfg: &KafkaConfig,
    topics: &BTreeMap<String, Duration>,
) -> anyhow::Result<TopicsReport> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg)?
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create Kafka admin client: {e}"))?;
    let configs: Vec<(&String, [(&'static str, String); 3])> = topics
        .iter()
        .map(|(t, keep)| (t, wanted(cfg, *keep)))
        .collect();
    let new: Vec<NewTopic<'_>> = configs
        .iter()
        .map(|(t, wanted)| {
            wanted.iter().fold(
                NewTopic::new(
                    t,
                    cfg.partitions,
                    TopicReplication::Fixed(cfg.replication_factor),
                ),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create topics on {}: {e}", cfg.brokers))?;
    let mut report = TopicsReport::default();
    for r in results {
        match r {
            Ok(t) => report.created.push(t),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => anyhow::bail!("cannot create topic {t}: {code}"),
        }
    }
    let existing: Vec<&(&String, [(&'static str, String); 3])> = configs
        .iter()
        .filter(|(t, _)| !report.created.contains(t))
        .collect();
    if !existing.is_empty() {
        let specs: Vec<ResourceSpecifier<'_>> = existing
            .iter()
            .map(|(t, _)| ResourceSpecifier::Topic(t))
            .collect();
        let described = admin
            .describe_configs(specs.iter(), &opts)
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot describe topic configs on {}: {e}", cfg.brokers)
            })?;
        for ((topic, wanted), found) in existing.iter().zip(described) {
            let found = found.map_err(|code| {
                anyhow::anyhow!("cannot describe the configs of {topic}: {code}")
            })?;
            for (name, value) in wanted {
                let was = found.get(name).and_then(|e| e.value.clone());
                if was.as_deref() != Some(value.as_str()) {
                    report.changed.push(ConfigChange {
                        topic: topic.to_string(),
                        name,
                        was,
                        now: value.clone(),
                    });
                }
            }
        }
    }
    let (changes, names) = (
        report.changed.clone(),
        topics.keys().cloned().collect::<Vec<_>>(),
    );
    tokio::task::spawn_blocking(move || {
        set_configs(admin.inner(), &changes)?;
        wait_for_leaders(admin.inner(), &names, ADMIN_TIMEOUT)
    })
    .await??;
    Ok(report)
}

/// Owns what the librdkafka calls of [`set_configs`] allocate.
struct Native {
    queue: *mut rdkafka::bindings::rd_kafka_queue_t,
    options: *mut rdkafka::bindings::rd_kafka_AdminOptions_t,
    resources: Vec<*mut rdkafka::bindings::rd_kafka_ConfigResource_t>,
    event: *mut rdkafka::bindings::rd_kafka_event_t,
}

impl Drop for Native {
    fn drop(&mut self) {
        use rdkafka::bindings as rd;
        // SAFETY: each pointer was made by librdkafka for this struct alone
        // and is destroyed once, here.
        unsafe {
            if !self.event.is_null() {
                rd::rd_kafka_event_destroy(self.event);
            }
            if !self.resources.is_empty() {
                rd::rd_kafka_ConfigResource_destroy_array(
                    self.resources.as_mut_ptr(),
                    self.resources.len(),
                );
            }
            if !self.options.is_null() {
                rd::rd_kafka_AdminOptions_destroy(self.options);
            }
            if !self.queue.is_null() {
                rd::rd_kafka_queue_destroy(self.queue);
            }
        }
    }
}

/// A C string librdkafka returned, or `fallback`.
///
/// SAFETY: `p` is null or a NUL-terminated string that outlives the call.
unsafe fn text(p: *const std::os::raw::c_char, fallback: &str) -> String {
    if p.is_null() {
        fallback.to_string()
    } else {
        // SAFETY: as the caller promises.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Sets `changes` with IncrementalAlterConfigs. rdkafka wraps only the
/// legacy AlterConfigs, which replaces a topic's whole config (dropping what
/// an operator set by hand) and which the embedded broker does not serve;
/// librdkafka's incremental call is used through its bindings.
fn set_configs<C: ClientContext>(
    client: &Client<C>,
    changes: &[ConfigChange],
) -> anyhow::Result<()> {
    use rdkafka::bindings as rd;
    if changes.is_empty() {
        return Ok(());
    }
    let mut by_topic: BTreeMap<&str, Vec<&ConfigChange>> = BTreeMap::new();
    for c in changes {
        by_topic.entry(&c.topic).or_default().push(c);
    }
    let rk = client.native_ptr();
    // SAFETY: `rk` lives as long as `client`; every object made here is
    // owned by `native` and destroyed when it drops; the strings passed are
    // copied by librdkafka.
    unsafe {
        let mut native = Native {
            queue: rd::rd_kafka_queue_new(rk),
            options: rd::rd_kafka_AdminOptions_new(
                rk,
                rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_INCREMENTALALTERCONFIGS,
            ),
            resources: Vec::new(),
            event: std::ptr::null_mut(),
        };
        let mut errstr = [0 as std::os::raw::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            native.options,
            ADMIN_TIMEOUT.as_millis() as i32,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        for (topic, configs) in &by_topic {
            let name = CString::new(*topic)?;
            let resource = rd::rd_kafka_ConfigResource_new(
                rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
                name.as_ptr(),
            );
            native.resources.push(resource);
            for c in configs {
                let (key, value) = (CString::new(c.name)?, CString::new(c.now.as_str())?);
                let error = rd::rd_kafka_ConfigResource_add_incremental_config(
                    resource,
                    key.as_ptr(),
                    rd::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_SET,
                    value.as_ptr(),
                );
                if !error.is_null() {
                    let why = text(rd::rd_kafka_error_string(error), "refused");
                    rd::rd_kafka_error_destroy(error);
                    anyhow::bail!("{topic}: cannot set {}={}: {why}", c.name, c.now);
                }
            }
        }
        rd::rd_kafka_IncrementalAlterConfigs(
            rk,
            native.resources.as_mut_ptr(),
            native.resources.len(),
            native.options,
            native.queue,
        );
        native.event = rd::rd_kafka_queue_poll(
            native.queue,
            (ADMIN_TIMEOUT + Duration::from_secs(5)).as_millis() as i32,
        );
        if native.event.is_null() {
            anyhow::bail!("no answer to IncrementalAlterConfigs within {ADMIN_TIMEOUT:?}");
        }
        let err = rd::rd_kafka_event_error(native.event);
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            anyhow::bail!(
                "cannot change topic configs: {}",
                text(rd::rd_kafka_event_error_string(native.event), "error")
            );
        }
        let result = rd::rd_kafka_event_IncrementalAlterConfigs_result(native.event);
        if result.is_null() {
            anyhow::bail!("IncrementalAlterConfigs: an unexpected answer");
        }
        let mut count = 0usize;
        let answers = rd::rd_kafka_IncrementalAlterConfigs_result_resources(result, &mut count);
        for i in 0..count {
            let answer = *answers.add(i);
            if rd::rd_kafka_ConfigResource_error(answer)
                != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            {
                anyhow::bail!(
                    "cannot change the configs of {}: {}",
                    text(rd::rd_kafka_ConfigResource_name(answer), "a topic"),
                    text(rd::rd_kafka_ConfigResource_error_string(answer), "refused")
                );
            }
        }
    }
    Ok(())
}

/// Waits until every partition of `topics` has a leader.
fn wait_for_leaders<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topics: &[String],
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let md = client.fetch_metadata(None, Duration::from_secs(5))?;
        let waiting: Vec<&str> = topics
            .iter()
            .filter(|name| {
                !md.topics().iter().any(|t| {
                    t.name() == name.as_str()
                        && t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions()
                            .iter()
                            .all(|p| p.leader() >= 0 && p.error().is_none())
                })
            })
            .map(String::as_str)
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "topics without a leader after {within:?}: {}",
                waiting.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
