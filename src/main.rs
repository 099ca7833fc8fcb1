fn main() -> std::process::ExitCode {
    ese::cli::main()
}
