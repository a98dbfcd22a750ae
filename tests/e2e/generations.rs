//! An rmcp client through the sidecar, in both protocol generations.

#![allow(deprecated)] // rmcp marks sampling deprecated (SEP-2577); servers still use it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, CreateMessageRequestParams,
    CreateMessageResult, ElicitRequestParams, ElicitResult, GetPromptRequestParams, Implementation,
    NumberOrString, ProgressNotificationParam, ProgressToken, ProtocolVersion,
    ReadResourceRequestParams, RequestMetaObject,
};
use rmcp::service::{NotificationContext, RequestContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{
    ClientHandler, ClientLifecycleMode, ClientServiceExt, ErrorData, RoleClient, ServiceExt,
};
use serde_json::{Value, json};

use crate::support::Stack;

/// An agent: answers sampling and elicitation, counts what the server sent it.
#[derive(Debug, Clone, Default)]
struct Agent {
    sampled: Arc<AtomicUsize>,
    elicited: Arc<AtomicUsize>,
    progress: Arc<AtomicUsize>,
}

impl ClientHandler for Agent {
    fn get_info(&self) -> ClientConfig {
        let caps: ClientCapabilities =
            serde_json::from_value(json!({"sampling": {}, "elicitation": {"form": {}}}))
                .unwrap_or_default();
        ClientConfig::new(caps, Implementation::new("toolmesh-e2e", "0"))
    }

    async fn create_message(
        &self,
        _params: CreateMessageRequestParams,
        _ctx: RequestContext<RoleClient>,
    ) -> Result<CreateMessageResult, ErrorData> {
        self.sampled.fetch_add(1, Ordering::SeqCst);
        serde_json::from_value(json!({"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "e2e"}))
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))
    }

    async fn create_elicitation(
        &self,
        _params: ElicitRequestParams,
        _ctx: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, ErrorData> {
        self.elicited.fetch_add(1, Ordering::SeqCst);
        serde_json::from_value(json!({"action": "accept", "content": {"username": "ferris", "email": "f@example.com"}}))
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))
    }

    async fn on_progress(
        &self,
        _params: ProgressNotificationParam,
        _ctx: NotificationContext<RoleClient>,
    ) {
        self.progress.fetch_add(1, Ordering::SeqCst);
    }
}

fn args(v: Value) -> rmcp::model::JsonObject {
    v.as_object().cloned().unwrap_or_default()
}

fn text_of(result: &impl serde::Serialize) -> String {
    let v = serde_json::to_value(result).unwrap_or_default();
    v["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn call(
    client: &RunningService<RoleClient, Agent>,
    name: &'static str,
    a: Value,
) -> Result<String> {
    let result = client
        .call_tool(CallToolRequestParams::new(name).with_arguments(args(a)))
        .await?;
    Ok(text_of(&result))
}

#[tokio::test]
async fn legacy_session_through_the_sidecar() -> Result<()> {
    let stack = Stack::start().await?;
    let agent = Agent::default();
    let client = agent
        .clone()
        .serve(StreamableHttpClientTransport::from_uri(stack.url()))
        .await?;
    let info = client.peer_info().expect("initialized");
    assert_eq!(info.protocol_version, ProtocolVersion::V_2025_11_25);

    let tools = client.list_all_tools().await?;
    assert!(tools.iter().any(|t| t.name == "echo"), "{tools:?}");
    assert_eq!(
        call(&client, "echo", json!({"text": "hello"})).await?,
        "hello"
    );
    assert_eq!(call(&client, "add", json!({"a": 2, "b": 40})).await?, "42");

    // Progress notifications ride the POST's SSE stream back through the sidecar.
    let mut params = CallToolRequestParams::new("test_tool_with_progress");
    params.meta = Some(RequestMetaObject::with_progress_token(ProgressToken(
        NumberOrString::String("p-1".into()),
    )));
    client.call_tool(params).await?;
    assert!(
        agent.progress.load(Ordering::SeqCst) >= 3,
        "progress notifications relayed"
    );

    // Server-to-client requests and the agent's answers (separate POSTs) both cross.
    let sampled = call(
        &client,
        "test_sampling",
        json!({"prompt": "Capital of France?"}),
    )
    .await?;
    assert_eq!(sampled, "LLM response: Paris");
    assert_eq!(agent.sampled.load(Ordering::SeqCst), 1);
    let elicited = call(&client, "test_elicitation", json!({"message": "Who?"})).await?;
    assert!(
        elicited.contains("action=accept") && elicited.contains("ferris"),
        "{elicited}"
    );
    assert_eq!(agent.elicited.load(Ordering::SeqCst), 1);

    let resources = client.list_all_resources().await?;
    assert!(resources.iter().any(|r| r.uri == "test://static-text"));
    let read = client
        .read_resource(ReadResourceRequestParams::new("test://template/7/data"))
        .await?;
    assert!(serde_json::to_string(&read)?.contains("Data for ID: 7"));
    let prompt = client
        .get_prompt(
            GetPromptRequestParams::new("test_prompt_with_arguments")
                .with_arguments(args(json!({"arg1": "a", "arg2": "b"}))),
        )
        .await?;
    assert!(serde_json::to_string(&prompt)?.contains("arg1='a', arg2='b'"));

    client.cancel().await?;
    Ok(())
}

#[tokio::test]
async fn modern_stateless_calls_and_input_required_through_the_sidecar() -> Result<()> {
    let stack = Stack::start().await?;
    let agent = Agent::default();
    let client = agent
        .clone()
        .serve_with_lifecycle(
            StreamableHttpClientTransport::from_uri(stack.url()),
            ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await?;
    // rmcp's client sends server/discover, then every request with Mcp-Method/Mcp-Name
    // and the _meta protocol version: the sidecar checks them and lets them through.
    assert_eq!(
        call(&client, "echo", json!({"text": "stateless"})).await?,
        "stateless"
    );
    assert!(client.list_all_tools().await?.len() > 10);

    // input_required: the first call returns it, the client answers and retries with
    // inputResponses and requestState; the sidecar relays both rounds untouched.
    let elicited = call(&client, "test_elicitation", json!({"message": "Who?"})).await?;
    assert!(
        elicited.contains("action=accept") && elicited.contains("ferris"),
        "{elicited}"
    );
    assert_eq!(agent.elicited.load(Ordering::SeqCst), 1);
    let sampled = call(&client, "test_sampling", json!({"prompt": "Capital?"})).await?;
    assert_eq!(sampled, "LLM response: Paris");

    let logs = stack.sidecar.logs();
    assert!(!logs.contains("\"level\":\"ERROR\""), "{logs}");
    client.cancel().await?;
    Ok(())
}
