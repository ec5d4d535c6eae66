// glibc malloc showed up as ~15% of a node's CPU under load (many small, short-lived
// allocations across two threads); mimalloc measured faster here (see README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    botclaw::cli::main()
}
