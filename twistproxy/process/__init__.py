"""Worker processes ([server] worker_processes > 1): master.py binds and supervises,
worker.py adopts the master's listening sockets and serves. With worker_processes = 1
none of this runs: the proxy is the single process it always was."""
