"""[cluster]: admin state shared by several hosts through Redis. `store` owns the
connection, `sync` the protocol (keys, versions, the reconciliation rule); the
master (or the one process) starts one `sync.ClusterSync` when [cluster] is there."""
