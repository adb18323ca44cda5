//! `profile set`: changing what may change in a profile's spec after creation.
//!
//! A change is a JSON object of spec fields (nested objects, such as `cpu` or `display`,
//! merge into the current value). It is checked whole (known and changeable keys, types,
//! [`ProfileSpec::validate`]) and written with one atomic replace of `profile.toml`, so
//! either every key changes or none does. It applies when the VMM next starts; channel rules
//! apply at the next transfer. A suspended profile's saved guest was made with its current
//! machine shape, so those keys are refused until it is stopped or resumed and stopped.

use serde_json::{Map, Value};

use super::Handset;
use crate::api_types::{ProfileInfo, ProfileState};
use crate::error::{Error, Result};
use crate::spec::ProfileSpec;
use crate::state_dir;

/// Keys that shape the machine (a saved guest was made with them).
pub const MACHINE_KEYS: &[&str] = &[
    "memory_mib",
    "vcpus",
    "cmdline",
    "display",
    "balloon",
    "mergeable",
];
/// Keys of policy and behaviour, changeable in any state.
pub const POLICY_KEYS: &[&str] = &[
    "memory_max_mib",
    "restart",
    "background",
    "cpu",
    "channels",
    "on_shutdown",
    "autostart",
];

/// `changes` merged into `spec`: objects merge key by key, anything else replaces.
pub fn merged(spec: &ProfileSpec, changes: &Map<String, Value>) -> Result<ProfileSpec> {
    for key in changes.keys() {
        if !MACHINE_KEYS.contains(&key.as_str()) && !POLICY_KEYS.contains(&key.as_str()) {
            let all = [MACHINE_KEYS, POLICY_KEYS].concat().join(", ");
            return Err(Error::BadRequest(format!(
                "{key:?} cannot be changed after creation (changeable: {all})"
            )));
        }
    }
    if changes.is_empty() {
        return Err(Error::BadRequest("nothing to change".into()));
    }
    check_nulls(changes, "")?;
    let mut v = serde_json::to_value(spec)
        .map_err(|e| Error::BadRequest(format!("cannot represent the spec: {e}")))?;
    merge(&mut v, &Value::Object(changes.clone()));
    let new: ProfileSpec =
        serde_json::from_value(v).map_err(|e| Error::BadRequest(e.to_string()))?;
    new.validate()?;
    Ok(new)
}

/// Settings that `null` sets back to their default (the optional ones of the spec).
pub const NULLABLE_KEYS: &[&str] = &[
    "memory_max_mib",
    "channels.clipboard_from",
    "channels.files_from",
];

/// Refuses a `null` anywhere but at [`NULLABLE_KEYS`].
fn check_nulls(changes: &Map<String, Value>, prefix: &str) -> Result<()> {
    for (k, v) in changes {
        let key = format!("{prefix}{k}");
        match v {
            Value::Null if !NULLABLE_KEYS.contains(&key.as_str()) => {
                return Err(Error::BadRequest(format!(
                    "{key} cannot be null (null resets only {})",
                    NULLABLE_KEYS.join(", ")
                )));
            }
            Value::Object(inner) => check_nulls(inner, &format!("{key}."))?,
            _ => {}
        }
    }
    Ok(())
}

/// Merges `from` into `into`: objects key by key, `null` removes the key (its default).
fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(k);
                    continue;
                }
                match a.get_mut(k) {
                    Some(old) if old.is_object() && v.is_object() => merge(old, v),
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

impl Handset {
    /// Changes `name`'s spec (see the module doc); returns the profile with its new spec.
    pub async fn set(&self, name: &str, changes: Map<String, Value>) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        let state = self.registry.state(name)?;
        let old = self.registry.spec(name)?;
        let new = merged(&old, &changes)?;
        crate::channels::check_peers(&new, Some(&old), |p| self.registry.state(p).is_ok())
            .map_err(Error::BadRequest)?;
        let machine: Vec<&str> = changes
            .keys()
            .map(String::as_str)
            .filter(|k| MACHINE_KEYS.contains(k))
            .collect();
        if state == ProfileState::Offloaded && !machine.is_empty() {
            return Err(Error::Conflict(format!(
                "profile {name} is offloaded: its guest runs at its cloud host with the current \
                 {}; bring it back with `pocketvisor profile return {name}` first",
                machine.join(", ")
            )));
        }
        if state == ProfileState::Suspended && !machine.is_empty() {
            return Err(Error::Conflict(format!(
                "profile {name} is suspended: its saved guest was made with the current {}; \
                 resume and stop it (or stop it with --discard) first",
                machine.join(", ")
            )));
        }
        state_dir::write_atomic(&self.dir().spec(name), new.to_toml()?.as_bytes())?;
        let mut what: Vec<String> = changes
            .iter()
            .map(|(k, v)| format!("{k}={}", compact(v)))
            .collect();
        what.sort();
        self.registry.event(name, "changed", &what.join(" "));
        self.show(name)
    }
}

/// A value for the event log, at most 200 characters.
fn compact(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> ProfileSpec {
        ProfileSpec::from_template("work", "w", crate::spec::TemplateBoot::Probe).unwrap()
    }

    fn changes(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn changes_merge_and_are_checked_whole() {
        let s = spec();
        let n = merged(
            &s,
            &changes(json!({"memory_mib": 512, "cpu": {"foreground": 300}})),
        )
        .unwrap();
        assert_eq!(n.memory_mib, 512);
        assert_eq!(n.cpu.foreground, 300);
        assert_eq!(n.cpu.background, s.cpu.background, "nested objects merge");
        assert_eq!(n.name, s.name);
        // null sets an optional setting back to its default.
        let limited = merged(&s, &changes(json!({"memory_max_mib": 1024}))).unwrap();
        assert_eq!(limited.memory_max(), 1024);
        let back = merged(&limited, &changes(json!({"memory_max_mib": null}))).unwrap();
        assert_eq!(
            (back.memory_max_mib, back.memory_max()),
            (None, s.memory_max())
        );
        for bad in [
            json!({"name": "other"}),
            json!({"disks": []}),
            json!({"memory_mib": 1}),
            json!({"vcpus": "many"}),
            json!({"autostart": true, "memory_mib": 1}),
            json!({"cpu": {"nonsense": 1}}),
            json!({"vcpus": null}),
            json!({"cpu": {"foreground": null}}),
            json!({}),
        ] {
            assert!(merged(&s, &changes(bad.clone())).is_err(), "{bad}");
        }
    }
}
