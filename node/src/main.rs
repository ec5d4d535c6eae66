fn main() -> std::process::ExitCode {
    botclaw::cli::main()
}
