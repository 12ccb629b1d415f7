"""rpc: the MCP transports (HTTP, stdio), JSON-RPC, sessions, the admin API."""
