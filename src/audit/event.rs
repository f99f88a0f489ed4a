//! What an audit record says: the event model producers fill in.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Mount,
    Unmount,
    Fetch,
    Renew,
    Rotate,
    Deny,
    Read,
    Error,
    /// A span in which events may be missing (a kernel queue overflowed, a restart).
    Gap,
    /// The last record of a segment: the file it is sealed as (`segment`).
    Seal,
    /// Retention deleted the oldest segments (`pruned` says which and where the chain was).
    Prune,
    /// A signature over the record before it (`checkpoint`), with the node's signing key.
    Checkpoint,
}

/// What a `checkpoint` record signs: the record before it (`seq`, its `link`, which chains
/// every earlier record), the segment (its first sequence number) and the checkpoint's time;
/// `signature` (Ed25519, hex) is by the key whose id is `key_id`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub link: String,
    pub segment: u64,
    pub key_id: String,
    pub signature: String,
}

/// What a `prune` record says was deleted: every record up to `through_seq`, the last of them
/// linked as `link` (what the first record kept names as `prev`), in the files `segments`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    pub through_seq: u64,
    pub link: String,
    pub segments: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    #[default]
    Success,
    Failure,
    Denied,
    /// A refresh failed and the last good value is still served.
    Stale,
}

/// The pod an event belongs to (node mode).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

/// One event as a producer describes it; the writer adds `seq`, `time` and `prev`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event: Option<EventKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A short, stable reason code for a denial (a provider's refusal code).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Context for an operator (e.g. "recovered after a restart").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessRef>,
    /// For coalesced reads: how many opens this record stands for (absent: one) ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// ... the first of which happened at this time (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_time: Option<String>,
    /// A `seal` record: the file name its segment is sealed as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
    /// A `prune` record: what retention deleted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruned: Option<Pruned>,
    /// A `checkpoint` record: the signature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

impl Event {
    pub fn new(kind: EventKind) -> Self {
        Self {
            event: Some(kind),
            ..Self::default()
        }
    }
    pub fn volume(mut self, v: impl Into<String>) -> Self {
        self.volume = Some(v.into());
        self
    }
    pub fn provider(mut self, v: impl Into<String>) -> Self {
        self.provider = Some(v.into());
        self
    }
    pub fn identity(mut self, v: impl Into<String>) -> Self {
        self.identity = Some(v.into());
        self
    }
    pub fn object(mut self, v: impl Into<String>) -> Self {
        self.object = Some(v.into());
        self
    }
    pub fn version(mut self, v: impl Into<String>) -> Self {
        self.version = Some(v.into());
        self
    }
    pub fn file(mut self, v: impl Into<String>) -> Self {
        self.file = Some(v.into());
        self
    }
    pub fn outcome(mut self, o: Outcome) -> Self {
        self.outcome = o;
        self
    }
    pub fn error(mut self, e: impl ToString) -> Self {
        self.error = Some(e.to_string());
        self.outcome = if self.outcome == Outcome::Success {
            Outcome::Failure
        } else {
            self.outcome
        };
        self
    }
    pub fn reason(mut self, r: impl Into<String>) -> Self {
        self.reason = Some(r.into());
        self
    }
    pub fn pod(mut self, p: PodRef) -> Self {
        self.pod = Some(p);
        self
    }
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }
    pub fn process(mut self, p: ProcessRef) -> Self {
        self.process = Some(p);
        self
    }
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency_ms = Some((d.as_secs_f64() * 1e6).round() / 1e3);
        self
    }
}
