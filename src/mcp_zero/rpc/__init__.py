"""rpc: the MCP transports (HTTP, stdio), JSON-RPC, sessions, the admin API."""

import signal

#: The signals that stop a server gracefully (requests in flight get their grace, and their
#: records): SIGHUP too, which a server started from a terminal or ssh session gets when
#: that session closes, and SIGQUIT; before, those two killed it on the spot (found by
#: review).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
