//! The kill switch's blocks as the data path reads them: the selectors that
//! name workloads, the stored entries, and the list of active blocks the
//! proxy checks once per connection. Changing the list, the kernel keys and
//! the live connections is [`crate::block`]'s job, above the proxy.

pub mod selector;

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

pub use selector::{CompiledFields, Fields, Selector, SelectorError};

use crate::{conn::Caller, identity::Identity, policy::Engine};

/// Who ran a command, as the audit records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    pub uid: u32,
    pub gid: u32,
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub user: Option<String>,
}

impl From<&Caller> for Actor {
    fn from(c: &Caller) -> Self {
        Self {
            uid: c.uid,
            gid: c.gid,
            pid: c.pid,
            user: c.user.clone(),
        }
    }
}

/// One block, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockEntry {
    /// Canonical selector text.
    pub selector: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub actor: Option<Actor>,
    /// When it was set (RFC 3339).
    pub since: String,
}

/// An active block.
#[derive(Debug)]
pub struct Active {
    pub entry: BlockEntry,
    pub selector: Selector,
}

/// The active blocks as the connection path sees them: one atomic load,
/// nothing when there are none.
pub struct BlockList {
    active: ArcSwap<Vec<Arc<Active>>>,
}

impl Default for BlockList {
    fn default() -> Self {
        Self {
            active: ArcSwap::from_pointee(Vec::new()),
        }
    }
}

impl std::fmt::Debug for BlockList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockList")
            .field("active", &self.active.load().len())
            .finish()
    }
}

impl BlockList {
    /// The first active block covering `id`.
    #[must_use]
    pub fn matching(&self, id: &Identity, engine: &Engine) -> Option<Arc<Active>> {
        let active = self.active.load();
        active
            .iter()
            .find(|a| a.selector.matches(id, engine))
            .cloned()
    }

    /// Makes `entries` the active blocks (entries whose selector no longer
    /// parses are left out).
    pub fn publish(&self, entries: &[BlockEntry]) {
        let v = entries
            .iter()
            .filter_map(|e| {
                Selector::parse(&e.selector).ok().map(|selector| {
                    Arc::new(Active {
                        entry: e.clone(),
                        selector,
                    })
                })
            })
            .collect();
        self.active.store(Arc::new(v));
    }
}
