"""The MCP stdio server (`lora-mcp`): thin tool wrappers over the trainer library. Built in the server issue."""
