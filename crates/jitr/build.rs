//! `jitr --version` names the commit it was built from: `JITR_COMMIT` when the packager sets
//! it, else `git rev-parse --short=12 HEAD` of the checkout, else `unknown` (a source tarball).

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=JITR_COMMIT");
    let commit = std::env::var("JITR_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    // Built again when HEAD moves: HEAD itself (a detached HEAD), the branches (cargo scans a
    // folder's files: a commit rewrites refs/heads/<branch>, or writes it first after a fresh
    // clone, which keeps it in packed-refs) and the packed refs. Only paths that exist: a
    // missing one would rebuild every time.
    let head = git(&["rev-parse", "--absolute-git-dir"]).map(|d| PathBuf::from(d).join("HEAD"));
    let common =
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]).map(PathBuf::from);
    let watched = [
        head,
        common.as_ref().map(|d| d.join("packed-refs")),
        common.as_ref().map(|d| d.join("refs/heads")),
    ];
    for path in watched.into_iter().flatten().filter(|p| p.exists()) {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    println!(
        "cargo::rustc-env=JITR_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
