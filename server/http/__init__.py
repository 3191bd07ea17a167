"""The HTTP front end (`lora-mcp http`): MCP Streamable HTTP, the guide's JSON API and file routes,
over the same tools and services as stdio; see server/http/app.py."""
