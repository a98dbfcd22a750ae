//! Who this sidecar acts as: the subject of every decision, audit line and sealed
//! session. A type of its own so it is never mixed up with the names a decision is
//! about (a tool, resource, prompt or server).

use std::fmt;
use std::sync::Arc;

/// This sidecar's identity (`--identity`, e.g. `agents/triage`). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Identity(Arc<str>);

impl Identity {
    pub fn new(name: &str) -> Identity {
        Identity(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Quoted like a string, so error messages read `for "agents/triage"`.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}
