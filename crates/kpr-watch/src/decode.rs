//! Decoding manifest files: YAML (multi-document) or JSON text into typed Services,
//! EndpointSlices, Nodes and ServiceCIDRs, skipping what cannot be decoded with one [`Problem`] each.
//!
//! Each document is decoded on its own, so one broken document costs only itself; a `kind: List`
//! is expanded. A document is read into a generic value, then into the model's lean object,
//! which takes what the proxy uses and never fails on the rest (`kpr_model::objects`): whether
//! the used fields make sense is the model's to say.

use kpr_model::objects::{EndpointSlice, Node, Service, ServiceCidr};
use kpr_model::{Input, ObjectKey, Update};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Something in a manifest that was not used, and why. The caller logs it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based document index within the file, when the problem is one document's.
    pub document: Option<usize>,
    /// `Kind ns/name` when it could be read.
    pub object: Option<String>,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Skipping manifest {}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, " document {d}")?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Every object read from a directory, sorted by key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub services: BTreeMap<ObjectKey, Service>,
    pub slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// The Node, when the directory defines one (the last one in path order).
    pub node: Option<Node>,
    /// ServiceCIDRs (`networking.k8s.io/v1` or `v1beta1`), by name.
    pub service_cidrs: BTreeMap<String, ServiceCidr>,
}

impl Snapshot {
    /// The events that make a fresh model equal to this snapshot: full lists of Services and
    /// EndpointSlices, the Node when there is one, and the ServiceCIDRs when there are some.
    pub fn into_inputs(self) -> Vec<Input> {
        let mut out = vec![
            Input::Services(Update::Replace(self.services.into_values().collect())),
            Input::Slices(Update::Replace(self.slices.into_values().collect())),
        ];
        if let Some(node) = self.node {
            out.push(Input::Node(Some(Box::new(node))));
        }
        if !self.service_cidrs.is_empty() {
            out.push(Input::ServiceCidrs(Update::Replace(
                self.service_cidrs.into_values().collect(),
            )));
        }
        out
    }

    /// Adds the objects of one file's text, recording problems. `file` is only for messages.
    pub fn add_text(&mut self, file: &Path, text: &str, problems: &mut Vec<Problem>) {
        let is_json = text.trim_start().starts_with(['{', '[']);
        let docs: Vec<String> = if is_json {
            vec![text.to_owned()]
        } else {
            split_documents(text)
        };
        for (i, doc) in docs.iter().enumerate() {
            let parsed: Result<Value, String> = if is_json {
                serde_json::from_str(doc).map_err(|e| e.to_string())
            } else {
                serde_saphyr::from_str(doc).map_err(|e| e.to_string())
            };
            let problem = |object: Option<String>, reason: String| Problem {
                file: file.to_owned(),
                document: (docs.len() > 1).then_some(i + 1),
                object,
                reason,
            };
            match parsed {
                Ok(Value::Null) => {}
                Ok(value) => self.add_value(value, &problem, problems),
                Err(e) => problems.push(problem(
                    None,
                    format!("not valid YAML/JSON: {}", first_line(&e)),
                )),
            }
        }
    }

    fn add_value(
        &mut self,
        value: Value,
        problem: &dyn Fn(Option<String>, String) -> Problem,
        problems: &mut Vec<Problem>,
    ) {
        let api = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if kind.ends_with("List")
            && let Some(Value::Array(items)) = value.get("items")
        {
            for item in items.clone() {
                self.add_value(item, problem, problems);
            }
            return;
        }
        let meta = value.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let ns = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        let cluster_scoped = kind == "Node" || kind == "ServiceCIDR";
        let label = if cluster_scoped {
            format!("{kind} {name}")
        } else {
            format!("{kind} {ns}/{name}")
        };
        let key = ObjectKey::new(
            if cluster_scoped {
                String::new()
            } else {
                ns.clone()
            },
            name.clone(),
        );
        let again = match (api.as_str(), kind.as_str()) {
            ("v1", "Service") => {
                let mut s: Service = lean(value);
                s.metadata.namespace = Some(ns);
                self.services.insert(key, s).is_some()
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                let mut s: EndpointSlice = lean(value);
                s.metadata.namespace = Some(ns);
                self.slices.insert(key, s).is_some()
            }
            ("v1", "Node") => self.node.replace(lean(value)).is_some(),
            ("networking.k8s.io/v1" | "networking.k8s.io/v1beta1", "ServiceCIDR") => {
                self.service_cidrs.insert(name, lean(value)).is_some()
            }
            _ => return, // other kinds (Deployments, ConfigMaps, ...) are not ours
        };
        if again {
            problems.push(problem(
                Some(label),
                "defined again; the later definition wins".into(),
            ));
        }
    }
}

/// The model's lean object: decoding one never fails (`kpr_model::objects`).
fn lean<T: serde::de::DeserializeOwned + Default>(value: Value) -> T {
    serde_json::from_value(value).unwrap_or_default()
}

/// Splits YAML text into documents at `---` lines (a document-end `...` line ends one too).
fn split_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        let marker =
            line.starts_with("---") && line[3..].chars().next().is_none_or(char::is_whitespace);
        if marker || line.trim_end() == "..." {
            docs.push(String::new());
            if marker {
                let rest = line[3..].trim();
                if let Some(d) = docs
                    .last_mut()
                    .filter(|_| !rest.is_empty() && !rest.starts_with('#'))
                {
                    d.push_str(rest);
                    d.push('\n');
                }
            }
            continue;
        }
        if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.retain(|d| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests;
