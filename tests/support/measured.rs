//! Figures that tests measure while they pass (requests under load, retries, delays, memory):
//! cargo captures the output of a passing test, so each figure also goes to a file that
//! `scripts/test` prints at the end of a run.

use std::io::Write;

/// Prints `MEASURED: <binary>: <figure>` on stderr (shown with `--nocapture` or when the test
/// fails) and appends the line to the file named by `OPSC_TEST_FIGURES`, when set
/// (`scripts/test` sets it, and prints the file after the summary of the run). One `write` of
/// a short line to a file opened for appending, so lines from test binaries running side by
/// side do not interleave.
pub fn measured(figure: impl AsRef<str>) {
    let binary = std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .map(|n| {
            n.rsplit_once('-')
                .map_or(n.clone(), |(name, _)| name.to_string())
        })
        .unwrap_or_default();
    let line = format!(
        "MEASURED: {binary}: {}\n",
        figure.as_ref().replace('\n', " ")
    );
    eprint!("{line}");
    if let Some(path) = std::env::var_os("OPSC_TEST_FIGURES")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}
