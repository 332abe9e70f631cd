//! The one progress bar of the CLI's long operations: on a terminal only (standard error), and
//! only for runs long enough to need one.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps, `{bar} {pos}/{len} <what>  {per_sec}  eta {eta}  {msg}`, shown when
/// standard error is a terminal and `len` is at least `from`; hidden (every call a no-op)
/// otherwise.
pub(crate) fn bar(len: usize, what: &str, from: usize) -> ProgressBar {
    if len < from || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    let template = format!("{{bar:40}} {{pos}}/{{len}} {what}  {{per_sec}}  eta {{eta}}  {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}
