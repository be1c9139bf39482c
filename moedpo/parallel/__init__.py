"""Where the run executes: backend choice (cpu / cuda / xla) and how models are sharded."""
