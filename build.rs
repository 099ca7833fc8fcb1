//! - Rebuilds when a migration or SQL function is added: `refinery::embed_migrations!`
//!   and `include_str!` read those directories at compile time, which cargo
//!   does not watch.
//! - Embeds every `pipelines/<stage>.toml`, so a stage's pipeline is its
//!   file there and no list is kept by hand (`config` reads the generated
//!   `pipelines.rs`).
use std::fmt::Write;

fn main() {
    // The checkout being built, read when the script runs: `env!` would be
    // the checkout the script was first compiled in, and a target directory
    // shared by two checkouts then embeds the other one's files.
    let root =
        std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=sql");
    println!("cargo:rerun-if-changed=pipelines");
    let dir = root.join("pipelines");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("pipelines/ is readable")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(name.strip_suffix(".toml")?.to_string())
        })
        .collect();
    names.sort();
    let mut out = String::from(
        "/// Every `pipelines/<stage>.toml`, by stage name.\npub const PIPELINES: &[(&str, &str)] = &[\n",
    );
    for n in &names {
        let path = dir.join(format!("{n}.toml"));
        writeln!(out, "    ({n:?}, include_str!({:?})),", path.display())
            .expect("write to a String");
    }
    out.push_str("];\n");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out_dir.join("pipelines.rs"), out).expect("write pipelines.rs");

    // Every `sql/functions/*.sql`, applied after the migrations.
    let dir = root.join("sql/functions");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("sql/functions/ is readable")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.ends_with(".sql").then_some(name)
        })
        .collect();
    files.sort();
    let mut out = String::from(
        "/// Every `sql/functions/*.sql`, by file name.\npub const FUNCTIONS: &[(&str, &str)] = &[\n",
    );
    for f in &files {
        writeln!(
            out,
            "    ({f:?}, include_str!({:?})),",
            dir.join(f).display()
        )
        .expect("write to a String");
    }
    out.push_str("];\n");
    // `embed_migrations!` reads migrations/ when the crate compiles, which
    // cargo does not track: a digest of them here makes a changed migration
    // recompile the crate that embeds it.
    let mut digest = std::collections::hash_map::DefaultHasher::new();
    let mut migrations: Vec<_> = std::fs::read_dir(root.join("migrations"))
        .expect("migrations/ is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    migrations.sort();
    for path in migrations {
        std::hash::Hash::hash(&path, &mut digest);
        std::hash::Hash::hash(&std::fs::read(&path).unwrap_or_default(), &mut digest);
    }
    writeln!(
        out,
        "// migrations/ digest {:x}",
        std::hash::Hasher::finish(&digest)
    )
    .expect("write to a String");
    std::fs::write(out_dir.join("functions.rs"), out).expect("write functions.rs");
}
