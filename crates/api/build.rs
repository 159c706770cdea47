//! Rebuilds the crate when anything under `assets/` changes, including new files, which
//! the embedding macro alone would not notice.

fn main() {
    println!("cargo:rerun-if-changed=assets");
}
