#![forbid(unsafe_code)]

fn main() {
    std::process::exit(interceptor::cli::main());
}
