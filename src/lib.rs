//! Event Stream Engine: a Kafka stream-processing pipeline for a WhatsApp/SMS
//! messaging platform, with PostgreSQL as the sink of record.
//!
//! Modules, from the bottom up (arrows point down; a test keeps `src/` free
//! of import circles):
//! - [`config`]: settings from `config/default.toml`, `pipelines/*.toml`, a
//!   file and the environment; `[topics]` names every topic once.
//! - [`model`]: the domain's states as enums (message, campaign, consent,
//!   send kind, channel) with the campaign state machine.
//! - [`records`]: the record types on the topics, one per schema; [`codec`]:
//!   their Avro encodings (single-object or schema-registry).
//! - [`db`]: the Postgres pool (TLS as `sslmode` asks), migrations and the SQL
//!   functions of `sql/functions/`, error classification, the audit trail's
//!   retention.
//! - [`kafka`]: the one place Kafka clients are configured (`mod.rs`); the
//!   producer, topic creation and out-of-group topic reading in its files.
//! - [`http`]: the one place HTTP clients are built; [`metrics`]: the
//!   Prometheus recorder and `/metrics`; [`periodic`]: the one loop
//!   background work runs in; [`phone`]: E.164 normalization.
//! - [`twilio`]: the provider: webhook signatures, credentials, the Messages
//!   API client, the table of error codes.
//! - [`runner`]: the stage runner — the one consumer loop every stage uses.
//! - [`stages`]: the registry of stages, one folder (or file) each: domain
//!   logic and SQL only.
//! - [`campaigns`]: templates, segment filters, commands, the admin API, the scheduler.
//! - [`bridge`]: the webhook bridge (axum): provider callbacks → Kafka, probes.
//! - [`sim`]: the Twilio-compatible provider simulator (`ese provider-sim`).
//! - [`broker`]: the embedded Kafka-API broker (tansu) for development and tests.
//! - [`reports`]: read-side queries (campaign performance, dashboard figures).
//! - [`ops`]: `ese status`, `replay`, `dlq` and `retention`.
//! - [`engine`]: wiring a process together (`ese up`, `serve`, `run`).
//! - [`demo`]: the whole loop on a running engine (`ese demo`).
//! - [`cli`]: the `ese` command line: parses and dispatches; `main.rs` only calls [`cli::main`].
//!
//! The pipeline benchmarks live outside the library, in `benches/pipeline`.

pub mod bridge;
pub mod broker;
pub mod campaigns;
pub mod cli;
pub mod codec;
pub mod config;
pub mod db;
pub mod demo;
pub mod engine;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod periodic;
pub mod phone;
pub mod records;
pub mod reports;
pub mod runner;
pub mod sim;
pub mod stages;
pub mod twilio;

/// The shape of the crate, kept by tests rather than by habit.
#[cfg(test)]
mod structure {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("src/ is readable").flatten() {
            let p = e.path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// The top-level module a file of `src/` belongs to (`src/stages/sender/mod.rs` → `stages`).
    fn module_of(src: &Path, file: &Path) -> String {
        let rel = file.strip_prefix(src).expect("under src/");
        let first = rel.components().next().expect("a path");
        first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string()
    }

    /// Arrows between top-level modules: `crate::x` named in a file of module `y` (not in its tests).
    fn arrows() -> BTreeMap<String, BTreeSet<String>> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for f in files {
            let from = module_of(&src, &f);
            if matches!(from.as_str(), "lib" | "main") {
                continue;
            }
            let text = std::fs::read_to_string(&f).expect("readable source");
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != from {
                    graph.entry(from.clone()).or_default().insert(name);
                }
            }
            graph.entry(from).or_default();
        }
        graph
    }

    #[test]
    fn no_import_circles_between_modules() {
        let graph = arrows();
        // Depth-first search for a back edge; report the circle it closes.
        fn visit(
            n: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|p| p == n) {
                let mut circle = path[at..].to_vec();
                circle.push(n.to_string());
                return Some(circle);
            }
            if done.contains(n) {
                return None;
            }
            path.push(n.to_string());
            for next in graph.get(n).into_iter().flatten() {
                if let Some(c) = visit(next, graph, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            done.insert(n.to_string());
            None
        }
        let mut done = BTreeSet::new();
        for n in graph.keys() {
            if let Some(circle) = visit(n, &graph, &mut Vec::new(), &mut done) {
                panic!("import circle: {}", circle.join(" → "));
            }
        }
    }

    #[test]
    fn config_imports_no_component() {
        let graph = arrows();
        let config = graph.get("config").cloned().unwrap_or_default();
        assert!(config.is_empty(), "config imports {config:?}");
    }
}
