"""The MCP server is a client of a node, like the gateway and the CLI: it uses only the
client contract in `meshllm.common.blackboard`, never the service's own modules."""

from __future__ import annotations

import ast
from pathlib import Path

import meshllm.blackboard.mcp_server as mcp_server


def test_the_mcp_server_uses_only_the_client_contract() -> None:
    tree = ast.parse(Path(mcp_server.__file__).read_text())
    imported = [node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names]
    service = [name for name in imported if name.startswith("meshllm.blackboard")]
    assert not service, f"the MCP server reaches into the service: {service}"
    assert "meshllm.common.blackboard.client" in imported
