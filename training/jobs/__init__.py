"""Background jobs, below both the server and the trainer: the job table (`store`), the devices each job
takes (`devices`), the claim of queued jobs, their child processes and the reconcile of running rows
(`queue`), and the space finished runs take (`cleanup`). Nothing here imports the server: a job's child
runs the same queue when it ends, so queued jobs start with no server running."""
