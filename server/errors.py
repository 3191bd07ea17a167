"""The one error type of the service layer.

Service functions raise `ServiceError` with a message written for the assistant that will read
it: what was wrong and what to do next. The MCP tool wrappers turn it into the SDK's ToolError;
tests call the services directly and read the same message.
"""


class ServiceError(ValueError):
    pass
