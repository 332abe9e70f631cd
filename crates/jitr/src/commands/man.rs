//! `jitr man`: manual pages, generated from the clap definitions.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use super::Outcome;
use crate::cli::{Cli, ManArgs};

pub(crate) fn man(args: ManArgs) -> Result<Outcome> {
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    match args.out {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(command).render(&mut page)?;
            std::io::stdout().lock().write_all(&page)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot make {}", dir.display()))?;
            let written = write_pages(command, &dir)?;
            eprintln!("jitr: wrote {written} manual pages into {}", dir.display());
        }
    }
    Ok(Outcome::Success)
}

/// Writes `command`'s page and its subcommands' (named `jitr-ca-init.1`, as man(1) finds them
/// from `man jitr-ca-init`), each whole before it appears: the count written.
fn write_pages(command: clap::Command, dir: &Path) -> Result<usize> {
    let mut written = 0;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        written += write_pages(sub.clone(), dir)?;
    }
    let man = clap_mangen::Man::new(command);
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write into {}", dir.display()))?;
    file.write_all(&page)
        .and_then(|()| file.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    // A page is read by everyone: tempfile makes 0600.
    set_readable(file.path())?;
    file.persist(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(written + 1)
}

fn set_readable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}
