"""The audit log: every action's outcome, hash-chained, group-committed, verifiable."""
