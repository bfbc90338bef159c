//! Headless Chromium (Debian's `chromium`): a page rendered to a PNG, with what it logged to the
//! console. Nothing it starts dials out: the flags below turn off its background fetches, and
//! the pages under test fetch nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::wait_exit;

/// The `chromium` command, or `None` (with a loud note) when it is not installed. Under
/// tests/run.sh (which sets SLUICEGATE_REQUIRE_BROWSER_TESTS) a missing browser fails the test.
pub fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None if std::env::var_os("SLUICEGATE_REQUIRE_BROWSER_TESTS").is_some() => {
            panic!("no `chromium` on PATH; run tests/run.sh (it installs Debian's chromium)")
        }
        None => {
            eprintln!("SKIPPED: no chromium (run tests/run.sh to install it and run this test)");
            None
        }
    }
}

/// A page as the browser showed it.
pub struct Rendered {
    /// The screenshot (PNG).
    pub png: PathBuf,
    /// Pixels that are not the white background.
    pub painted: usize,
    pub pixels: usize,
    /// Every console message the page logged (errors, warnings, logs, CSP refusals).
    pub console: Vec<String>,
}

impl Rendered {
    /// What is wrong with the page as shown: blank (under 1% of the pixels painted), or
    /// anything on the console (the report has no script, so a line there is an error, or a
    /// refusal of a script or fetch by the page's Content-Security-Policy).
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self
            .console
            .iter()
            .map(|l| format!("console: {l}"))
            .collect();
        if self.painted * 100 < self.pixels {
            problems.push(format!(
                "blank: {} of {} pixels painted",
                self.painted, self.pixels
            ));
        }
        problems
    }
}

/// Renders `page` (an HTML file) at `width`×`height` into `out` (a PNG). Chromium's log on
/// stderr names each console message `CONSOLE`, whatever its level.
pub fn render(chromium: &Path, page: &Path, width: u32, height: u32, out: &Path) -> Rendered {
    let profile = tempfile::tempdir().unwrap();
    let stderr = profile.path().join("stderr.log");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", out.display()))
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("start chromium");
    let status = wait_exit(&mut child, Duration::from_secs(90));
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(status.success(), "chromium failed: {status}\n{log}");
    let console = log
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_owned)
        .collect();
    let (painted, pixels) = painted_pixels(out);
    Rendered {
        png: out.to_owned(),
        painted,
        pixels,
        console,
    }
}

/// (pixels not near white, all pixels) of an 8-bit RGB or RGBA PNG.
fn painted_pixels(png_file: &Path) -> (usize, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_file).expect("the screenshot exists"),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected screenshot colour type {other:?}"),
    };
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let pixels = &buf[..info.buffer_size()];
    let painted = pixels
        .chunks_exact(channels)
        .filter(|p| p[..3].iter().any(|&c| c < 240))
        .count();
    (painted, pixels.len() / channels)
}
