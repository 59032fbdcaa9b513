#![forbid(unsafe_code)]

/// mimalloc: the per-statement path allocates a few small objects (audit
/// event fields, verdicts); glibc's malloc showed as a tenth of the
/// agent's time in profiles of the relay.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(interceptor::cli::main());
}
