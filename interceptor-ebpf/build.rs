//! Rebuild the kernel programs when bpf-linker changes (a new LLVM can change
//! the object), as aya's template does.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found: run `cargo xtask setup`"),
    }
}
