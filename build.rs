//! Rebuilds when a migration is added: `refinery::embed_migrations!` reads the
//! `migrations/` directory at compile time, which cargo does not watch.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
