/// mimalloc: the stages allocate and free many small objects per record
/// (decoded webhooks, JSON payloads, Kafka messages); glibc's allocator took
/// a large share of the CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ese::cli::main()
}
