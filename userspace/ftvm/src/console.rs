//! The guest console: stdout, and a log file when asked.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Writes every console byte to stdout and, if configured, appends it to a file.
#[derive(Debug)]
pub struct ConsoleTee {
    stdout: io::Stdout,
    file: Option<File>,
}

impl ConsoleTee {
    /// Opens (appending) the optional log file.
    pub fn new(log: Option<&Path>) -> io::Result<Self> {
        let file = match log {
            Some(path) => Some(OpenOptions::new().create(true).append(true).open(path)?),
            None => None,
        };
        Ok(Self { stdout: io::stdout(), file })
    }
}

impl Write for ConsoleTee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // stdout going away (a closed pipe) must not stop the VM; the log file still gets it.
        let _ = self.stdout.write_all(buf);
        if let Some(file) = &mut self.file {
            file.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.stdout.flush();
        if let Some(file) = &mut self.file {
            file.flush()?;
        }
        Ok(())
    }
}
