//! The CLI's progress on standard error: the one progress bar of its long operations (on a
//! terminal only, and only for runs long enough to need one), and [`Phases`] for work whose
//! length is learnt as it goes.

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

/// Progress of work in phases whose length may be unknown (`jitr status`'s reads): each
/// phase's count on standard error, `<command>: <phase>: <done>[/<total>]`, at most every half
/// second; rewritten in place on a terminal, one line each otherwise.
pub(crate) struct Phases {
    command: &'static str,
    terminal: bool,
    last: std::sync::Mutex<(String, std::time::Instant)>,
}

impl Phases {
    pub(crate) fn new(command: &'static str) -> Phases {
        Phases {
            command,
            terminal: std::io::stderr().is_terminal(),
            last: std::sync::Mutex::new((String::new(), std::time::Instant::now())),
        }
    }

    pub(crate) fn step(&self, what: &str, done: usize, total: Option<usize>) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let finished = total.is_some_and(|t| done >= t);
        if last.0 == what && last.1.elapsed() < std::time::Duration::from_millis(500) && !finished {
            return;
        }
        let line = match total {
            Some(total) => format!("{}: {what}: {done}/{total}", self.command),
            None => format!("{}: {what}: {done}", self.command),
        };
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
        *last = (what.to_owned(), std::time::Instant::now());
    }

    /// Ends the line a terminal was rewriting.
    pub(crate) fn done(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}
