//! `ese replay`: a stopped stage's consumer group moved to process records again.

use std::collections::BTreeMap;

use serde::Serialize;

use super::describe_group;
use crate::config::Settings;
use crate::kafka::{PartitionOffsets, TopicReader};

/// Where `replay` moves a group.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Every partition's log start.
    Earliest,
    /// Explicit offsets: (topic, or None for the stage's only input; partition; offset).
    Offsets(Vec<(Option<String>, i32, i64)>),
    /// The first record at or after this time (ms since the epoch); the end
    /// where every record is older.
    Time(i64),
}

impl Target {
    /// Parses `--to-offset` values: `[TOPIC/]PARTITION:OFFSET[,…]`.
    pub fn parse_offsets(text: &str) -> anyhow::Result<Target> {
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (topic, rest) = match part.rsplit_once('/') {
                Some((t, r)) => (Some(t.to_string()), r),
                None => (None, part),
            };
            let bad = || {
                anyhow::anyhow!(
                    "--to-offset {part:?}: expected [TOPIC/]PARTITION:OFFSET, e.g. 0:1200"
                )
            };
            let (p, o) = rest.split_once(':').ok_or_else(bad)?;
            let p: i32 = p.trim().parse().map_err(|_| bad())?;
            let o: i64 = o.trim().parse().map_err(|_| bad())?;
            if p < 0 || o < 0 {
                return Err(bad());
            }
            out.push((topic, p, o));
        }
        if out.is_empty() {
            anyhow::bail!("--to-offset: no PARTITION:OFFSET given");
        }
        Ok(Target::Offsets(out))
    }

    /// Parses `--to-time` (RFC 3339).
    pub fn parse_time(text: &str) -> anyhow::Result<Target> {
        let t = chrono::DateTime::parse_from_rfc3339(text.trim()).map_err(|e| {
            anyhow::anyhow!(
                "--to-time {text:?}: not an RFC 3339 time ({e}); e.g. 2026-11-26T09:00:00Z"
            )
        })?;
        Ok(Target::Time(t.timestamp_millis()))
    }
}

/// One partition's line of a replay plan.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlanRow {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset (None: nothing committed yet).
    pub committed: Option<i64>,
    /// The offset the group will resume from.
    pub new: i64,
    pub end: i64,
    /// Records that will be processed again (negative: skipped).
    pub again: i64,
}

/// What `ese replay` will do to a stage's consumer group.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub stage: String,
    pub group: String,
    pub rows: Vec<PlanRow>,
}

impl Plan {
    /// Records processed again in total.
    pub fn again(&self) -> i64 {
        self.rows.iter().map(|r| r.again.max(0)).sum()
    }

    /// The plan as a table for people.
    pub fn render(&self) -> String {
        let mut out = format!(
            "replay plan for stage {} (consumer group {}):\n{:<32} {:>9} {:>12} {:>12} {:>12} {:>10}\n",
            self.stage, self.group, "topic", "partition", "committed", "new", "end", "again"
        );
        for r in &self.rows {
            let committed = r
                .committed
                .map_or_else(|| "-".to_string(), |c| c.to_string());
            out.push_str(&format!(
                "{:<32} {:>9} {:>12} {:>12} {:>12} {:>10}\n",
                r.topic, r.partition, committed, r.new, r.end, r.again
            ));
        }
        out.push_str(&format!(
            "{} records will be processed again\n",
            self.again()
        ));
        out
    }
}

/// Works out where `target` puts `stage`'s group on each input partition.
pub async fn replay_plan(
    settings: &Settings,
    stage: &str,
    target: &Target,
) -> anyhow::Result<Plan> {
    let pipeline = settings.pipeline(stage)?;
    let reader = TopicReader::new(&settings.kafka)?;
    if let Target::Offsets(given) = target {
        for (topic, p, _) in given {
            match topic {
                Some(t) if !pipeline.inputs.contains(t) => anyhow::bail!(
                    "--to-offset: {t} is not an input of stage {stage} (inputs: {})",
                    pipeline.inputs.join(", ")
                ),
                None if pipeline.inputs.len() > 1 => anyhow::bail!(
                    "--to-offset {p}:…: stage {stage} reads {} topics ({}); write TOPIC/PARTITION:OFFSET",
                    pipeline.inputs.len(),
                    pipeline.inputs.join(", ")
                ),
                _ => {}
            }
        }
    }
    let mut rows = Vec::new();
    for topic in &pipeline.inputs {
        let offsets = reader.group_offsets(&pipeline.group_id, topic).await?;
        let starts: BTreeMap<i32, i64> = reader.start_offsets(topic).await?.into_iter().collect();
        let new: BTreeMap<i32, i64> = match target {
            Target::Earliest => starts.clone(),
            Target::Time(ms) => reader
                .offsets_for_time(topic, *ms)
                .await?
                .into_iter()
                .map(|(p, o)| {
                    let end = offsets
                        .iter()
                        .find(|x| x.partition == p)
                        .map_or(0, |x| x.end);
                    (p, o.unwrap_or(end))
                })
                .collect(),
            Target::Offsets(given) => {
                let mut m = BTreeMap::new();
                for (t, p, o) in given {
                    if t.as_ref().is_none_or(|t| t == topic) {
                        let Some(part) = offsets.iter().find(|x| x.partition == *p) else {
                            anyhow::bail!("--to-offset: {topic} has no partition {p}");
                        };
                        let start = starts.get(p).copied().unwrap_or(0);
                        if *o < start || *o > part.end {
                            anyhow::bail!(
                                "--to-offset {p}:{o}: {topic}[{p}] holds offsets {start}..{} (the end is {})",
                                part.end.max(start + 1) - 1,
                                part.end
                            );
                        }
                        m.insert(*p, *o);
                    }
                }
                m
            }
        };
        for PartitionOffsets {
            partition,
            committed,
            end,
            ..
        } in offsets
        {
            let Some(&to) = new.get(&partition) else {
                continue; // --to-offset leaves partitions it does not name alone
            };
            let from = committed.unwrap_or_else(|| starts.get(&partition).copied().unwrap_or(0));
            rows.push(PlanRow {
                topic: topic.clone(),
                partition,
                committed,
                new: to,
                end,
                again: from.min(end) - to,
            });
        }
    }
    Ok(Plan {
        stage: stage.to_string(),
        group: pipeline.group_id.clone(),
        rows,
    })
}

/// Commits the plan's offsets for its group. Refuses while the group has
/// members: a running stage would overwrite them with its own commits.
pub async fn apply_replay(settings: &Settings, plan: &Plan) -> anyhow::Result<()> {
    refuse_if_active(settings, &plan.group, &plan.stage).await?;
    let offsets: Vec<(String, i32, i64)> = plan
        .rows
        .iter()
        .map(|r| (r.topic.clone(), r.partition, r.new))
        .collect();
    super::commit_offsets(settings, &plan.group, &offsets).await
}

async fn refuse_if_active(settings: &Settings, group: &str, stage: &str) -> anyhow::Result<()> {
    let g = describe_group(settings, group).await?;
    if !g.members.is_empty() {
        let names: Vec<String> = g.members.iter().map(|m| m.to_string()).collect();
        anyhow::bail!(
            "stage {stage} is running: consumer group {group} is {} with {} member(s): {}. Stop them first.",
            g.state,
            names.len(),
            names.join("; ")
        );
    }
    Ok(())
}

/// Records of `plan`'s partitions the group has not committed past yet.
pub async fn remaining(settings: &Settings, plan: &Plan) -> anyhow::Result<i64> {
    let reader = TopicReader::new(&settings.kafka)?;
    let mut topics: Vec<&String> = plan.rows.iter().map(|r| &r.topic).collect();
    topics.dedup();
    let mut left = 0;
    for topic in topics {
        for p in reader.group_offsets(&plan.group, topic).await? {
            if let Some(row) = plan
                .rows
                .iter()
                .find(|r| &r.topic == topic && r.partition == p.partition)
            {
                let at = p.committed.unwrap_or(row.new);
                left += (row.end - at).max(0);
            }
        }
    }
    Ok(left)
}

/// `ese replay`: prints the plan, moves the group (unless `dry_run`), and
/// with `follow` shows a progress bar until the restarted stage caught up.
pub async fn replay_command(
    settings: &Settings,
    stage: &str,
    target: &Target,
    dry_run: bool,
    follow: bool,
) -> anyhow::Result<()> {
    let plan = replay_plan(settings, stage, target).await?;
    print!("{}", plan.render());
    if dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    apply_replay(settings, &plan).await?;
    println!(
        "consumer group {} moved; start the stage to process again",
        plan.group
    );
    if !follow {
        return Ok(());
    }
    let total = plan.again().max(0) as u64;
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} records ({per_sec}, eta {eta})",
        )?
        .progress_chars("=> "),
    );
    bar.set_message(format!("{stage} catching up"));
    loop {
        let left = remaining(settings, &plan).await?;
        bar.set_position(total.saturating_sub(left as u64));
        if left == 0 {
            bar.finish_and_clear();
            println!("{stage} caught up: {total} records processed again");
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
