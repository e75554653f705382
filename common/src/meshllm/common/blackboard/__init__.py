"""The blackboard's client contract: what the gateway, the CLI and the MCP server need to
talk to a node (the types its calls return, their conversion, the client and its errors).
What only the service itself uses (peer-record validation, digests, ids) lives with it."""
