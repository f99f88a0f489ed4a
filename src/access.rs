//! Who may open a volume's files: the policy a binding gives its volumes (`readers`,
//! `executables`) and its check of one opener. The check is pure; the three places that see
//! opens apply it (fanotify permission events for tmpfs volumes, the FUSE `open` request,
//! the broker API's caller) and answer a refusal with an error and a `deny` record.
//!
//! The default is today's: anyone who can reach the files may open them, and every open is
//! audited. `readers: pod` admits only processes whose cgroup belongs to the volume's pod;
//! `executables` narrows that to programs at these paths (as the process sees them, inside
//! its container).

use serde::{Deserialize, Serialize};

use crate::procinfo::ProcessRef;

/// The most executables a binding may list, and the longest path.
pub const MAX_EXECUTABLES: usize = 64;
pub const MAX_EXECUTABLE_PATH: usize = 4096;

/// Who may open a volume's files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readers {
    /// Only processes of the volume's own pod.
    pub pod_only: bool,
    /// With `pod_only`: only these programs (absolute paths inside the container; empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub executables: Vec<String>,
}

/// Why an open was refused: what the record and the log say (no secret, no value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

impl Readers {
    /// Builds the policy from a binding's fields, validated.
    pub fn parse(readers: Option<&str>, executables: Option<Vec<String>>) -> Result<Self, String> {
        let pod_only = match readers.unwrap_or("any") {
            "any" => false,
            "pod" => true,
            other => {
                return Err(format!(
                    "readers {other:?}: must be \"pod\" (only the volume's pod may open its files) or \"any\" (the default: every open audited)"
                ));
            }
        };
        let executables = executables.unwrap_or_default();
        if !executables.is_empty() && !pod_only {
            return Err(
                "executables narrows readers: pod; set readers: pod with it (a list of programs says nothing about who runs them)".into(),
            );
        }
        if executables.len() > MAX_EXECUTABLES {
            return Err(format!(
                "executables lists {} programs; at most {MAX_EXECUTABLES}",
                executables.len()
            ));
        }
        for e in &executables {
            if !e.starts_with('/')
                || e.len() > MAX_EXECUTABLE_PATH
                || e.split('/').any(|c| c == ".." || c == ".")
                || e.contains('\0')
                || e.ends_with('/')
            {
                return Err(format!(
                    "executable {e:?} must be an absolute, normalized path to a program (as the container sees it)"
                ));
            }
        }
        Ok(Self {
            pod_only,
            executables,
        })
    }

    /// Whether opens are checked at all (the default only audits them).
    pub fn enforced(&self) -> bool {
        self.pod_only
    }

    /// Decides one open of a file of `pod_uid`'s volume by `reader`.
    pub fn check(&self, pod_uid: &str, reader: &ProcessRef) -> Result<(), Refusal> {
        if !self.pod_only {
            return Ok(());
        }
        match reader.pod_uid.as_deref() {
            Some(p) if !pod_uid.is_empty() && p == pod_uid => {}
            Some(p) => {
                return Err(Refusal(format!(
                    "readers: pod; the opener runs in another pod ({p})"
                )));
            }
            None => {
                return Err(Refusal(
                    "readers: pod; the opener runs in no pod (the host)".into(),
                ));
            }
        }
        if self.executables.is_empty() {
            return Ok(());
        }
        match reader.exe.as_deref() {
            Some(exe) if self.executables.iter().any(|e| e == exe) => Ok(()),
            Some(_) => Err(Refusal(
                "readers: pod with executables; the opener's program is not one of them".into(),
            )),
            None => Err(Refusal(
                "readers: pod with executables; the opener's program could not be read".into(),
            )),
        }
    }

    /// One line for `keybroker check`.
    pub fn explain(&self) -> String {
        match (self.pod_only, self.executables.as_slice()) {
            (false, _) => "any process that can reach the files may open them; every open is audited (readers: any)".into(),
            (true, []) => "only processes of the volume's own pod may open its files; other opens are refused and audited as denials (readers: pod)".into(),
            (true, exes) => format!(
                "only processes of the volume's own pod running {} may open its files; other opens are refused and audited as denials (readers: pod, executables)",
                exes.join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(pod: Option<&str>, exe: Option<&str>) -> ProcessRef {
        ProcessRef {
            pid: 7,
            pod_uid: pod.map(str::to_owned),
            exe: exe.map(str::to_owned),
            ..Default::default()
        }
    }

    #[test]
    fn the_default_admits_everyone() {
        let r = Readers::parse(None, None).unwrap();
        assert!(!r.enforced());
        assert!(r.check("p1", &reader(None, None)).is_ok());
        assert!(r.explain().contains("readers: any"));
    }

    #[test]
    fn pod_only_admits_the_pod_and_refuses_others_and_the_host() {
        let r = Readers::parse(Some("pod"), None).unwrap();
        assert!(r.check("p1", &reader(Some("p1"), Some("/bin/sh"))).is_ok());
        let other = r.check("p1", &reader(Some("p2"), None)).unwrap_err();
        assert!(other.0.contains("another pod (p2)"), "{other:?}");
        let host = r
            .check("p1", &reader(None, Some("/usr/bin/cat")))
            .unwrap_err();
        assert!(host.0.contains("no pod"), "{host:?}");
        // A volume whose pod is unknown admits nobody.
        assert!(r.check("", &reader(Some(""), None)).is_err());
    }

    #[test]
    fn executables_narrow_the_pod() {
        let r = Readers::parse(Some("pod"), Some(vec!["/app/server".into()])).unwrap();
        assert!(
            r.check("p1", &reader(Some("p1"), Some("/app/server")))
                .is_ok()
        );
        assert!(
            r.check("p1", &reader(Some("p1"), Some("/bin/cat")))
                .is_err()
        );
        assert!(r.check("p1", &reader(Some("p1"), None)).is_err());
        assert!(
            r.check("p1", &reader(Some("p2"), Some("/app/server")))
                .is_err()
        );
        assert!(r.explain().contains("/app/server"));
    }

    #[test]
    fn bad_policies_say_what_is_wrong() {
        for (readers, exes, says) in [
            (Some("everyone"), None, "must be"),
            (None, Some(vec!["/app/server".to_string()]), "readers: pod"),
            (Some("pod"), Some(vec!["server".to_string()]), "absolute"),
            (
                Some("pod"),
                Some(vec!["/app/../bin/sh".to_string()]),
                "normalized",
            ),
            (Some("pod"), Some(vec!["/app/".to_string()]), "normalized"),
            (
                Some("pod"),
                Some(vec!["/a".to_string(); MAX_EXECUTABLES + 1]),
                "at most",
            ),
        ] {
            let e = Readers::parse(readers, exes).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
