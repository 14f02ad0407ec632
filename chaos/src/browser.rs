//! Headless Chromium through Selenium WebDriver (`py/browser.py`), one command at a time.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// A running browser; dropped, it quits.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Browser {
    /// Starts Chromium (headless) with its driver.
    pub fn start() -> Result<Browser> {
        let mut child = Command::new(crate::python()?)
            .arg(crate::py_script("browser.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start py/browser.py")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut b = Browser {
            child,
            stdin: Some(stdin),
            stdout,
        };
        let first = b.read()?;
        if first["ready"] != true {
            bail!("the browser did not start: {first}");
        }
        Ok(b)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the browser process ended");
        }
        Ok(serde_json::from_str(&line)?)
    }

    fn call(&mut self, cmd: Value) -> Result<Value> {
        let stdin = self.stdin.as_mut().context("the browser was closed")?;
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
        let r = self.read()?;
        if r["ok"] != true {
            bail!("{}: {}", cmd["op"], r["error"]);
        }
        Ok(r)
    }

    pub fn open(&mut self, url: &str) -> Result<()> {
        self.call(json!({"op": "open", "url": url})).map(|_| ())
    }

    /// The value of a script (`return ...`).
    pub fn eval(&mut self, js: &str) -> Result<Value> {
        Ok(self.call(json!({"op": "eval", "js": js}))?["value"].clone())
    }

    /// Waits until a script returns something truthy; its value and the seconds waited.
    pub fn wait(&mut self, js: &str, timeout_secs: f64) -> Result<(Value, f64)> {
        let r = self.call(json!({"op": "wait", "js": js, "timeout": timeout_secs}))?;
        Ok((r["value"].clone(), r["waited"].as_f64().unwrap_or_default()))
    }

    pub fn screenshot(&mut self, path: &std::path::Path) -> Result<()> {
        self.call(json!({"op": "shot", "path": path})).map(|_| ())
    }

    /// The console errors logged so far.
    pub fn console_errors(&mut self) -> Result<Vec<String>> {
        Ok(serde_json::from_value(
            self.call(json!({"op": "errors"}))?["value"].clone(),
        )?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing stdin ends the script's loop, which quits the browser.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}
