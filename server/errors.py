"""The error types of the service layer.

Service functions raise `ServiceError` with a message written for the assistant that will read
it: what was wrong and what to do next. The MCP tool wrappers turn it into the SDK's ToolError;
tests call the services directly and read the same message. A `WorkspaceStateError` is the kind of
ServiceError that the HTTP API answers 409 rather than 422 (issue 13).
"""


class ServiceError(ValueError):
    pass


class WorkspaceStateError(ServiceError):
    """The arguments are well-formed, but the workspace's current state refuses the call: a name or id
    that does not exist there (an unknown job, config, dataset, LoRA, upload, run, checkpoint or sample),
    a name already taken, a job in a state that does not allow it (already running, nothing to stop, not
    resumable, no LoRA yet), an upload id already in use or already finished, a file the workspace holds
    that is corrupt or cannot be read or written. The same call can succeed once the workspace changes.

    Everything else stays a plain ServiceError, an argument error: a malformed name ('..', '/'), a path
    outside the allowed folders or one that is not there, invalid base64, an out-of-range value, a file
    the caller sent that is corrupt, options that conflict, a model this machine does not have."""
