//! The one place that says what each MCP method is to the sidecar: whether policy
//! gates it and on what, which `params` field `Mcp-Name` mirrors, whether its answer is
//! a list to filter, and its metric label. Everything else matches on [`Method`],
//! never on the method's text.
//!
//! Unknown methods parse as [`Method::Other`]: relayed as protocol plumbing, labelled
//! `other`, never gated (policy gates what names a tool, resource or prompt).

use crate::mcp::TargetKind;

/// An MCP method, parsed once from the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Initialize,
    Ping,
    Discover,
    ToolsList,
    ToolsCall,
    ResourcesList,
    ResourcesTemplatesList,
    ResourcesRead,
    ResourcesSubscribe,
    ResourcesUnsubscribe,
    PromptsList,
    PromptsGet,
    CompletionComplete,
    LoggingSetLevel,
    TasksGet,
    TasksList,
    TasksResult,
    TasksCancel,
    TasksUpdate,
    SubscriptionsListen,
    NotificationsInitialized,
    NotificationsCancelled,
    NotificationsProgress,
    NotificationsRootsListChanged,
    /// Any other method: relayed, never gated.
    Other,
}

/// Which list a list method returns: the kind of its items, the result member that
/// holds them, and the item member that names each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct List {
    pub kind: TargetKind,
    pub field: &'static str,
    pub key: &'static str,
}

/// Every method with its wire name; [`Method::parse`] and [`Method::name`] read it.
const TABLE: &[(Method, &str)] = &[
    (Method::Initialize, "initialize"),
    (Method::Ping, "ping"),
    (Method::Discover, "server/discover"),
    (Method::ToolsList, "tools/list"),
    (Method::ToolsCall, "tools/call"),
    (Method::ResourcesList, "resources/list"),
    (Method::ResourcesTemplatesList, "resources/templates/list"),
    (Method::ResourcesRead, "resources/read"),
    (Method::ResourcesSubscribe, "resources/subscribe"),
    (Method::ResourcesUnsubscribe, "resources/unsubscribe"),
    (Method::PromptsList, "prompts/list"),
    (Method::PromptsGet, "prompts/get"),
    (Method::CompletionComplete, "completion/complete"),
    (Method::LoggingSetLevel, "logging/setLevel"),
    (Method::TasksGet, "tasks/get"),
    (Method::TasksList, "tasks/list"),
    (Method::TasksResult, "tasks/result"),
    (Method::TasksCancel, "tasks/cancel"),
    (Method::TasksUpdate, "tasks/update"),
    (Method::SubscriptionsListen, "subscriptions/listen"),
    (
        Method::NotificationsInitialized,
        "notifications/initialized",
    ),
    (Method::NotificationsCancelled, "notifications/cancelled"),
    (Method::NotificationsProgress, "notifications/progress"),
    (
        Method::NotificationsRootsListChanged,
        "notifications/roots/list_changed",
    ),
];

impl Method {
    /// The method a body names (exactly: MCP method names are case-sensitive).
    pub fn parse(name: &str) -> Method {
        TABLE
            .iter()
            .find(|(_, n)| *n == name)
            .map_or(Method::Other, |(m, _)| *m)
    }

    /// The wire name, or `other`: also the `method` metric label, so label values
    /// never come from free text on the network.
    pub fn name(self) -> &'static str {
        TABLE
            .iter()
            .find(|(m, _)| *m == self)
            .map_or("other", |(_, n)| n)
    }

    /// Does policy decide this method (default deny)? Everything else is plumbing.
    pub fn is_gated(self) -> bool {
        matches!(
            self,
            Method::ToolsCall
                | Method::ResourcesRead
                | Method::ResourcesSubscribe
                | Method::PromptsGet
                | Method::CompletionComplete
        )
    }

    /// What a gated method acts on, when the method alone says (`completion/complete`
    /// acts on what its `ref` names).
    pub fn gate(self) -> Option<TargetKind> {
        match self {
            Method::ToolsCall => Some(TargetKind::Tool),
            Method::ResourcesRead | Method::ResourcesSubscribe => Some(TargetKind::Resource),
            Method::PromptsGet => Some(TargetKind::Prompt),
            _ => None,
        }
    }

    /// The `params` member `Mcp-Name` mirrors for this method, if any.
    pub fn target_field(self) -> Option<&'static str> {
        match self {
            Method::ToolsCall | Method::PromptsGet => Some("name"),
            Method::ResourcesRead | Method::ResourcesSubscribe | Method::ResourcesUnsubscribe => {
                Some("uri")
            }
            Method::TasksGet | Method::TasksUpdate | Method::TasksCancel | Method::TasksResult => {
                Some("taskId")
            }
            _ => None,
        }
    }

    /// Must a 2026-07-28 request of this method carry `Mcp-Name`?
    pub fn name_required(self) -> bool {
        matches!(
            self,
            Method::ToolsCall | Method::ResourcesRead | Method::PromptsGet
        )
    }

    /// The list this method's answer carries, if it is a list method.
    pub fn list(self) -> Option<List> {
        let (kind, field, key) = match self {
            Method::ToolsList => (TargetKind::Tool, "tools", "name"),
            Method::PromptsList => (TargetKind::Prompt, "prompts", "name"),
            Method::ResourcesList => (TargetKind::Resource, "resources", "uri"),
            Method::ResourcesTemplatesList => {
                (TargetKind::Resource, "resourceTemplates", "uriTemplate")
            }
            _ => return None,
        };
        Some(List { kind, field, key })
    }
}

/// Every list kind, for streams whose events answer no request the sidecar saw.
pub const ALL_LISTS: [Method; 4] = [
    Method::ToolsList,
    Method::ResourcesList,
    Method::ResourcesTemplatesList,
    Method::PromptsList,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_other() {
        for (method, name) in TABLE {
            assert_eq!(Method::parse(name), *method);
            assert_eq!(method.name(), *name);
        }
        assert_eq!(Method::parse("Tools/Call"), Method::Other);
        assert_eq!(Method::parse(&"x".repeat(10_000)).name(), "other");
        assert_eq!(TABLE.len(), 24, "every variant but Other is in the table");
    }

    #[test]
    fn what_each_method_is() {
        let gated: Vec<_> = TABLE
            .iter()
            .filter(|(m, _)| m.is_gated())
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(
            gated,
            [
                "tools/call",
                "resources/read",
                "resources/subscribe",
                "prompts/get",
                "completion/complete"
            ]
        );
        let lists: Vec<_> = TABLE
            .iter()
            .filter(|(m, _)| m.list().is_some())
            .map(|(m, _)| *m)
            .collect();
        assert_eq!(lists, ALL_LISTS);
        // Every method whose target Mcp-Name mirrors has a metric label of its own.
        for (method, name) in TABLE {
            if method.target_field().is_some() {
                assert_eq!(method.name(), *name);
            }
        }
        assert_eq!(Method::TasksUpdate.target_field(), Some("taskId"));
        assert_eq!(Method::CompletionComplete.gate(), None, "its ref decides");
    }
}
