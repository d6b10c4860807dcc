//! A small typed QMP (QEMU Machine Protocol) client over a Unix socket.
//!
//! QMP is line-delimited JSON. The server greets with `{"QMP": {...}}`; the client must send
//! `qmp_capabilities` before anything else; then every `{"execute": ..., "id": n}` gets one
//! `{"return": ..., "id": n}` or `{"error": {"class", "desc"}, "id": n}`. Asynchronous events
//! (`{"event": ...}`) may arrive at any time in between: they are kept, not mistaken for
//! replies.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// How long one QMP reply may take before the client gives up (a guard against hangs).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// QEMU's version, from the greeting.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct QemuVersion {
    /// Major, minor and micro numbers.
    pub qemu: VersionTriple,
    /// The distribution's package version string.
    #[serde(default)]
    pub package: String,
}

/// `major.minor.micro`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: QemuVersion,
}

/// An error reply: QEMU's error class and its description.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct CommandError {
    /// The error class, e.g. `GenericError`, `CommandNotFound`.
    pub class: String,
    /// The human-readable description.
    pub desc: String,
}

/// An asynchronous event (`SHUTDOWN`, `POWERDOWN`, `STOP`, ...).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Event {
    /// The event's name.
    pub event: String,
    /// Its data, when it has any.
    #[serde(default)]
    pub data: Value,
}

/// The reply of `query-status`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The run state: `running`, `paused`, `internal-error`, `shutdown`, ...
    pub status: String,
}

/// One device of `query-blockstats` (the fields the tests compare against).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BlockStatsEntry {
    /// The `-device` id (`qdev`), e.g. `/machine/peripheral/vblk0/virtio-backend`.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The `-drive` id (`disk0`), where the device has one.
    #[serde(default)]
    pub device: Option<String>,
    /// The counters.
    pub stats: BlockStats,
}

/// The counters of one `query-blockstats` entry.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct BlockStats {
    /// Bytes read by the guest.
    pub rd_bytes: u64,
    /// Bytes written by the guest.
    pub wr_bytes: u64,
    /// Bytes discarded (unmapped) by the guest.
    #[serde(default)]
    pub unmap_bytes: u64,
    /// Read requests.
    pub rd_operations: u64,
    /// Write requests.
    pub wr_operations: u64,
    /// Flush requests.
    pub flush_operations: u64,
    /// Discard requests.
    #[serde(default)]
    pub unmap_operations: u64,
}

/// A connected, capabilities-negotiated QMP session.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    version: QemuVersion,
    events: Vec<Event>,
    next_id: u64,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .map_err(|e| Error::Qmp(format!("cannot connect to {}: {e}", path.display())))?;
        Self::from_stream(stream)
    }

    /// Runs the QMP handshake over an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Result<Self> {
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| Error::Qmp(format!("cannot set a read timeout: {e}")))?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::Qmp(format!("cannot clone the socket: {e}")))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            version: QemuVersion {
                qemu: VersionTriple {
                    major: 0,
                    minor: 0,
                    micro: 0,
                },
                package: String::new(),
            },
            events: Vec::new(),
            next_id: 1,
        };
        let greeting = qmp.read_message()?;
        let greeting: Greeting = serde_json::from_value(greeting.clone())
            .map_err(|e| Error::Qmp(format!("unexpected greeting {greeting}: {e}")))?;
        qmp.version = greeting.qmp.version;
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    /// QEMU's version as given in the greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.version
    }

    /// Runs `command` with `arguments` (`Value::Null` for none) and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| Error::Qmp(format!("cannot send `{command}`: {e}")))?;
        loop {
            let msg = self.read_message()?;
            if msg.get("event").is_some() {
                let event: Event = serde_json::from_value(msg.clone())
                    .map_err(|e| Error::Qmp(format!("malformed event {msg}: {e}")))?;
                self.events.push(event);
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(Error::Qmp(format!(
                    "reply to `{command}` carries the wrong id: {msg}"
                )));
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let err: CommandError = serde_json::from_value(err.clone())
                    .map_err(|e| Error::Qmp(format!("malformed error reply {msg}: {e}")))?;
                return Err(Error::Qmp(format!(
                    "`{command}` failed: {} ({})",
                    err.desc, err.class
                )));
            }
            return Err(Error::Qmp(format!(
                "unexpected reply to `{command}`: {msg}"
            )));
        }
    }

    /// Runs `command` and deserializes its return value into `T`.
    pub fn execute_as<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<T> {
        let value = self.execute(command, arguments)?;
        serde_json::from_value(value.clone())
            .map_err(|e| Error::Qmp(format!("unexpected reply to `{command}` ({value}): {e}")))
    }

    /// `query-status`: whether the guest's CPUs run, and the run state.
    pub fn query_status(&mut self) -> Result<StatusInfo> {
        self.execute_as("query-status", Value::Null)
    }

    /// `query-blockstats`: the hypervisor's own I/O counters per block device.
    pub fn query_blockstats(&mut self) -> Result<Vec<BlockStatsEntry>> {
        self.execute_as("query-blockstats", Value::Null)
    }

    /// `block_resize`: makes the drive `device` (the `-drive` id) `size` bytes long (QEMU
    /// truncates or extends its file; the guest's virtio-blk sees a new capacity).
    pub fn block_resize(&mut self, device: &str, size: u64) -> Result<()> {
        self.execute("block_resize", json!({ "device": device, "size": size }))
            .map(drop)
    }

    /// `system_powerdown`: presses the ACPI power button (the guest flushes and exits).
    pub fn system_powerdown(&mut self) -> Result<()> {
        self.execute("system_powerdown", Value::Null).map(drop)
    }

    /// `quit`: stops QEMU at once (the guest gets no chance to flush).
    pub fn quit(&mut self) -> Result<()> {
        self.execute("quit", Value::Null).map(drop)
    }

    /// The asynchronous events received so far, oldest first.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| Error::Qmp(format!("reading from QEMU: {e}")))?;
            if n == 0 {
                return Err(Error::Qmp("QEMU closed the QMP connection".into()));
            }
            if !line.trim().is_empty() {
                break;
            }
        }
        serde_json::from_str(line.trim())
            .map_err(|e| Error::Qmp(format!("not JSON from QEMU ({}): {e}", line.trim())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::thread;

    /// A scripted QMP server: answers each request line with the given replies.
    fn fake_server(script: Vec<Vec<&'static str>>) -> (UnixStream, thread::JoinHandle<Vec<Value>>) {
        let (client, server) = UnixStream::pair().unwrap();
        let handle = thread::spawn(move || {
            let mut writer = server.try_clone().unwrap();
            let mut reader = BufReader::new(server);
            writer
                .write_all(
                    b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian\"}, \"capabilities\": []}}\r\n",
                )
                .unwrap();
            let mut requests = Vec::new();
            for replies in script {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let req: Value = serde_json::from_str(&line).unwrap();
                let id = req["id"].clone();
                requests.push(req);
                for reply in replies {
                    let mut v: Value = serde_json::from_str(reply).unwrap();
                    if v.get("event").is_none() {
                        v["id"] = id.clone();
                    }
                    writer.write_all(format!("{v}\r\n").as_bytes()).unwrap();
                }
            }
            requests
        });
        (client, handle)
    }

    #[test]
    fn handshake_commands_and_events() {
        let (client, server) = fake_server(vec![
            vec![r#"{"return": {}}"#],
            vec![
                r#"{"event": "POWERDOWN", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                r#"{"return": {"running": true, "singlestep": false, "status": "running"}}"#,
            ],
            vec![
                r#"{"return": [{"device": "", "qdev": "/machine/peripheral/vblk0/virtio-backend", "stats": {"rd_bytes": 512, "wr_bytes": 4096, "unmap_bytes": 0, "rd_operations": 1, "wr_operations": 2, "flush_operations": 3, "unmap_operations": 0, "rd_total_time_ns": 5}}]}"#,
            ],
            vec![
                r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        ]);
        let mut qmp = Qmp::from_stream(client).unwrap();
        assert_eq!(qmp.version().qemu.major, 7);
        let status = qmp.query_status().unwrap();
        assert!(status.running);
        assert_eq!(status.status, "running");
        assert_eq!(qmp.events().len(), 1);
        assert_eq!(qmp.events()[0].event, "POWERDOWN");
        let stats = qmp.query_blockstats().unwrap();
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].stats.wr_bytes, 4096);
        assert_eq!(stats[0].stats.flush_operations, 3);
        let err = qmp.execute("nope", json!({"x": 1})).unwrap_err();
        assert!(err.to_string().contains("CommandNotFound"), "{err}");
        let requests = server.join().unwrap();
        assert_eq!(requests[0]["execute"], "qmp_capabilities");
        assert!(requests[0].get("arguments").is_none());
        assert_eq!(requests[3]["arguments"]["x"], 1);
    }

    #[test]
    fn closed_connection_is_an_error_not_a_hang() {
        let (client, server) = UnixStream::pair().unwrap();
        drop(server);
        let err = Qmp::from_stream(client).err().expect("must fail");
        assert!(err.to_string().contains("closed"), "{err}");
    }
}
