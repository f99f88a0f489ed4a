//! A record as the tools read it: the fields verification, queries and reports look at,
//! borrowed from the line where they can be (one parse per line, no tree of values: over
//! months of log that is most of the work).

use std::borrow::Cow;

use serde::Deserialize;

/// Text borrowed from the line unless it had escapes.
pub type Text<'a> = Option<Cow<'a, str>>;

#[derive(Debug, Default, Deserialize)]
pub struct RecordView<'a> {
    pub seq: Option<u64>,
    #[serde(borrow)]
    pub time: Text<'a>,
    #[serde(borrow)]
    pub event: Text<'a>,
    #[serde(borrow)]
    pub outcome: Text<'a>,
    #[serde(borrow)]
    pub prev: Text<'a>,
    #[serde(borrow)]
    pub segment: Text<'a>,
    #[serde(borrow)]
    pub volume: Text<'a>,
    #[serde(borrow)]
    pub object: Text<'a>,
    #[serde(borrow)]
    pub file: Text<'a>,
    #[serde(borrow)]
    pub version: Text<'a>,
    #[serde(borrow)]
    pub identity: Text<'a>,
    #[serde(borrow)]
    pub reason: Text<'a>,
    #[serde(borrow)]
    pub error: Text<'a>,
    #[serde(borrow)]
    pub detail: Text<'a>,
    pub count: Option<u64>,
    #[serde(borrow)]
    pub pod: Option<PodView<'a>>,
    #[serde(borrow)]
    pub process: Option<ProcessView<'a>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PodView<'a> {
    #[serde(borrow)]
    pub namespace: Text<'a>,
    #[serde(borrow)]
    pub name: Text<'a>,
    #[serde(borrow)]
    pub uid: Text<'a>,
    #[serde(borrow)]
    pub service_account: Text<'a>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ProcessView<'a> {
    pub pid: Option<u64>,
    pub uid: Option<u64>,
    #[serde(borrow)]
    pub comm: Text<'a>,
    #[serde(borrow)]
    pub exe: Text<'a>,
    #[serde(borrow)]
    pub pod_uid: Text<'a>,
    #[serde(borrow)]
    pub container: Text<'a>,
}

/// Characters that must not reach an auditor's terminal or page as they are: control
/// characters (terminal escapes) and the invisible ones that reorder or hide text (bidi
/// overrides and isolates, zero-width characters). Process names and executable paths are
/// the reading process's own choice.
pub fn hides_text(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
        )
}

/// The text of an optional field ("" when absent).
pub fn t<'b>(v: &'b Text<'_>) -> &'b str {
    v.as_deref().unwrap_or_default()
}

impl<'a> RecordView<'a> {
    pub fn parse(line: &'a [u8]) -> Option<Self> {
        serde_json::from_slice(line).ok()
    }

    pub fn time(&self) -> &str {
        t(&self.time)
    }
    pub fn event(&self) -> &str {
        t(&self.event)
    }
    pub fn namespace(&self) -> &str {
        self.pod
            .as_ref()
            .map(|p| t(&p.namespace))
            .unwrap_or_default()
    }
    pub fn pod_name(&self) -> &str {
        self.pod.as_ref().map(|p| t(&p.name)).unwrap_or_default()
    }
    pub fn pod_uid(&self) -> &str {
        self.pod.as_ref().map(|p| t(&p.uid)).unwrap_or_default()
    }
    pub fn service_account(&self) -> &str {
        self.pod
            .as_ref()
            .map(|p| t(&p.service_account))
            .unwrap_or_default()
    }
    pub fn comm(&self) -> &str {
        self.process
            .as_ref()
            .map(|p| t(&p.comm))
            .unwrap_or_default()
    }
    pub fn exe(&self) -> &str {
        self.process.as_ref().map(|p| t(&p.exe)).unwrap_or_default()
    }
    pub fn container(&self) -> &str {
        self.process
            .as_ref()
            .map(|p| t(&p.container))
            .unwrap_or_default()
    }
    /// The pod the reading process runs in (from its cgroup), if any.
    pub fn reader_pod_uid(&self) -> Option<&str> {
        self.process.as_ref().and_then(|p| p.pod_uid.as_deref())
    }
    pub fn reader_uid(&self) -> Option<u64> {
        self.process.as_ref().and_then(|p| p.uid)
    }
    pub fn reader_pid(&self) -> Option<u64> {
        self.process.as_ref().and_then(|p| p.pid)
    }
}
