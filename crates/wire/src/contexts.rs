//! The registry of bounded contexts (ADR 13): which context owns each
//! category, as every client, writer and coordinator reads it from
//! `<prefix>.contexts`.
//!
//! A record is a claim: key the category, value [`Claim`] as JSON. The topic
//! has one partition and keeps its records forever, and **the first valid
//! claim of a category wins**: later claims of it, and records that do not
//! decode, change nothing, so every reader of the topic agrees on the owner
//! of every category whatever it read before. A category no context claims
//! belongs to the default context.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::limits::shorten;
use crate::stream::is_valid_category;
use crate::topics::{DEFAULT_CONTEXT, check_context_name};

/// Most bytes of a claim record's value.
pub const MAX_CLAIM_BYTES: usize = 4096;

/// A context's claim of a category.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub context: String,
    /// When the claim was written (ms since the epoch).
    pub at_ms: i64,
    /// Who wrote it: the writer's host and instance, for people.
    #[serde(default)]
    pub by: String,
}

/// Which context owns each claimed category.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContextMap {
    owners: HashMap<String, Claim>,
}

impl ContextMap {
    /// Applies one record of the registry topic in order. `Err`: the record
    /// was not a claim (it is ignored; the reason is for a log line).
    pub fn apply(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<(), String> {
        let category = key.and_then(|k| std::str::from_utf8(k).ok()).filter(|c| is_valid_category(c));
        let Some(category) = category else {
            return Err(format!("a claim's key must be a category; got {:?}", key.map(String::from_utf8_lossy)));
        };
        let Some(value) = value.filter(|v| v.len() <= MAX_CLAIM_BYTES) else {
            return Err(format!("claim of '{category}': no value, or over {MAX_CLAIM_BYTES} bytes"));
        };
        let claim: Claim = serde_json::from_slice(value)
            .map_err(|e| format!("claim of '{category}' is not valid: {}", shorten(&e.to_string(), 200)))?;
        if claim.context != DEFAULT_CONTEXT {
            check_context_name(&claim.context)?;
        }
        self.owners.entry(category.to_owned()).or_insert(claim);
        Ok(())
    }

    /// The context that claimed `category`, if one did.
    pub fn claim(&self, category: &str) -> Option<&Claim> {
        self.owners.get(category)
    }

    /// The context a category's requests go to: its claimant's, else the
    /// default context.
    pub fn context_of(&self, category: &str) -> &str {
        self.claim(category).map_or(DEFAULT_CONTEXT, |c| c.context.as_str())
    }

    /// Every context named by a claim, and its categories (sorted).
    pub fn contexts(&self) -> std::collections::BTreeMap<&str, Vec<&str>> {
        let mut out: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for (category, claim) in &self.owners {
            out.entry(claim.context.as_str()).or_default().push(category.as_str());
        }
        out.values_mut().for_each(|v| v.sort_unstable());
        out
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(context: &str) -> Vec<u8> {
        serde_json::to_vec(&Claim { context: context.into(), at_ms: 1, by: "t".into() }).unwrap()
    }

    #[test]
    fn the_first_claim_of_a_category_wins_and_forged_records_change_nothing() {
        let mut map = ContextMap::default();
        map.apply(Some(b"account"), Some(&claim("payments"))).unwrap();
        map.apply(Some(b"account"), Some(&claim("inventory"))).unwrap();
        assert_eq!(map.context_of("account"), "payments");
        assert_eq!(map.context_of("order"), DEFAULT_CONTEXT, "unclaimed: the default context");

        for (key, value) in [
            (Some(&b"Bad Key"[..]), Some(claim("x"))),
            (None, Some(claim("x"))),
            (Some(b"order"), None),
            (Some(b"order"), Some(b"{not json".to_vec())),
            (Some(b"order"), Some(claim("events"))),
            (Some(b"order"), Some(claim("a.b"))),
            (Some(b"order"), Some(vec![b' '; MAX_CLAIM_BYTES + 1])),
            (Some(&[0xff, 0xfe][..]), Some(claim("x"))),
        ] {
            assert!(map.apply(key, value.as_deref()).is_err(), "{key:?}");
        }
        assert_eq!(map.context_of("order"), DEFAULT_CONTEXT);
        map.apply(Some(b"inventory"), Some(&claim(DEFAULT_CONTEXT))).unwrap();
        let contexts = map.contexts();
        assert_eq!(contexts["payments"], vec!["account"]);
        assert_eq!(contexts[DEFAULT_CONTEXT], vec!["inventory"]);
    }
}
