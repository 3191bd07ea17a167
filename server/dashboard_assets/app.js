/* The show-training-dashboard MCP App: the bridge to the host (MCP Apps, SEP-1865, spec 2026-01-26).

The host renders this document in a sandboxed iframe and speaks JSON-RPC 2.0 with it over postMessage:
this View sends `ui/initialize`, then `ui/notifications/initialized`; the host sends
`ui/notifications/tool-input` (the call's arguments) and `ui/notifications/tool-result` (the call's
CallToolResult, whose structuredContent is the JobView); the View calls the server through the host with
`tools/call` and `resources/read`, and reports its size with `ui/notifications/size-changed`. No
library: the spec's messages are few and plain. The job is drawn by LoraDashboard.renderJob (job_view.js),
the same code as the web dashboard's job page. */
(function () {
  "use strict";

  var PROTOCOL_VERSION = "2026-01-26";
  var TOOL = "show-training-dashboard";
  var REFRESH_MS = 3000; // while the job is queued or running: one tools/call every 3 s
  var LIVE_STATES = ["queued", "running"];
  var METHOD_NOT_FOUND = -32601;

  var root = document.getElementById("job");
  var statusLine = document.getElementById("app-status");
  var nextId = 1;
  var pending = {}; // request id -> {resolve, reject}
  var jobId = null;
  var lastState = null; // the state of the last JobView shown: refreshes go on while it is queued or running
  var refreshTimer = null;
  var tornDown = false;

  function send(message) {
    window.parent.postMessage(message, "*");
  }

  function request(method, params) {
    var id = nextId++;
    return new Promise(function (resolve, reject) {
      pending[id] = { resolve: resolve, reject: reject };
      send({ jsonrpc: "2.0", id: id, method: method, params: params });
    });
  }

  function notify(method, params) {
    send({ jsonrpc: "2.0", method: method, params: params });
  }

  function showStatus(text, isError) {
    statusLine.textContent = text;
    statusLine.hidden = !text;
    statusLine.classList.toggle("error", Boolean(isError));
  }

  // The text of a CallToolResult (what the assistant reads: for an error, what went wrong and what to do).
  function resultText(result) {
    return (result.content || [])
      .filter(function (block) { return block.type === "text"; })
      .map(function (block) { return block.text; })
      .join("\n");
  }

  function callTool(name, args) {
    return request("tools/call", { name: name, arguments: args }).then(function (result) {
      if (result.isError) {
        throw new Error(resultText(result) || name + " failed");
      }
      return result;
    });
  }

  // A sample as a data: URL. renderJob asks once per cell (again for a failed or re-rendered one): no cache here.
  function sampleSrc(filename) {
    var uri = "lora://jobs/" + encodeURIComponent(jobId) + "/samples/" + encodeURIComponent(filename);
    return request("resources/read", { uri: uri }).then(function (result) {
      var content = (result.contents || [])[0];
      if (!content || !content.blob) {
        throw new Error("no image in " + uri);
      }
      return "data:" + (content.mimeType || "image/png") + ";base64," + content.blob;
    });
  }

  function act(tool) {
    return function () {
      clearTimeout(refreshTimer);
      // A refusal (e.g. nothing to resume from) rejects: renderJob shows its reason beside the buttons.
      return callTool(tool, { job_id: jobId }).then(refresh, function (error) {
        return refresh().then(function () { throw error; });
      });
    };
  }

  var hooks = { sampleSrc: sampleSrc, stop: act("stop-training"), resume: act("resume-training") };

  // The next refresh, while the last job shown is queued or running: a failed refresh (the host or the
  // server briefly away) keeps the last view and tries again, so a job that ends still shows it.
  function scheduleRefresh() {
    clearTimeout(refreshTimer);
    if (!tornDown && LIVE_STATES.indexOf(lastState) >= 0) {
      refreshTimer = setTimeout(refresh, REFRESH_MS);
    }
  }

  // A tool result (the host's or our own refresh's): draw its JobView, or say what went wrong.
  function show(result) {
    var view = result.structuredContent;
    if (result.isError) {
      showStatus(resultText(result) || TOOL + " failed", true);
    } else if (!view || !view.row) {
      showStatus(resultText(result), false);
    } else {
      jobId = view.row.job_id;
      lastState = view.row.state;
      showStatus("", false);
      window.LoraDashboard.renderJob(root, view, hooks);
    }
    scheduleRefresh();
  }

  function refresh() {
    if (tornDown || jobId === null) {
      return Promise.resolve();
    }
    return request("tools/call", { name: TOOL, arguments: { job_id: jobId } }).then(show, function (error) {
      showStatus("Could not refresh the job: " + error.message, true);
      scheduleRefresh();
    });
  }

  function applyHostContext(context) {
    if (!context) {
      return;
    }
    if (context.theme === "light" || context.theme === "dark") {
      document.documentElement.dataset.theme = context.theme;
      document.documentElement.style.colorScheme = context.theme;
    }
    var variables = (context.styles && context.styles.variables) || {};
    Object.keys(variables).forEach(function (name) {
      if (variables[name]) {
        document.documentElement.style.setProperty(name, variables[name]);
      }
    });
  }

  var handlers = {
    "ui/notifications/tool-input": function (params) {
      var args = (params && params.arguments) || {};
      if (args.job_id && jobId === null) {
        jobId = args.job_id;
        showStatus("Loading job " + jobId + "…", false);
      }
    },
    "ui/notifications/tool-result": show,
    "ui/notifications/tool-cancelled": function (params) {
      showStatus("The call was cancelled" + (params && params.reason ? ": " + params.reason : "."), true);
    },
    "ui/notifications/host-context-changed": applyHostContext,
  };

  // Requests from the host: teardown (stop refreshing, then answer) and ping.
  var hostRequests = {
    "ui/resource-teardown": function () {
      tornDown = true;
      clearTimeout(refreshTimer);
      return {};
    },
    ping: function () { return {}; },
  };

  function onResponse(message) {
    var waiting = pending[message.id];
    if (!waiting) {
      return;
    }
    delete pending[message.id];
    if (message.error) {
      waiting.reject(new Error(message.error.message || "error " + message.error.code));
    } else {
      waiting.resolve(message.result);
    }
  }

  function onHostRequest(message) {
    var handler = hostRequests[message.method];
    if (handler) {
      send({ jsonrpc: "2.0", id: message.id, result: handler(message.params) });
    } else {
      send({ jsonrpc: "2.0", id: message.id, error: { code: METHOD_NOT_FOUND, message: "unknown method " + message.method } });
    }
  }

  window.addEventListener("message", function (event) {
    var message = event.data;
    if (event.source !== window.parent || !message || message.jsonrpc !== "2.0") {
      return;
    }
    if (message.method === undefined) {
      onResponse(message);
    } else if (message.id !== undefined) {
      onHostRequest(message);
    } else if (handlers[message.method]) {
      handlers[message.method](message.params);
    }
  });

  // The host sizes the iframe to the View's content (flexible container dimensions).
  var lastSize = "";
  function reportSize() {
    var element = document.documentElement;
    var size = { width: Math.ceil(element.scrollWidth), height: Math.ceil(element.scrollHeight) };
    if (size.width + "x" + size.height !== lastSize) {
      lastSize = size.width + "x" + size.height;
      notify("ui/notifications/size-changed", size);
    }
  }

  if (window.parent === window) {
    showStatus("This page is an MCP App: an MCP Apps host (e.g. Claude Desktop) shows it when the assistant calls " +
      TOOL + ".", true);
    return;
  }
  showStatus("Waiting for the training job…", false);
  request("ui/initialize", {
    protocolVersion: PROTOCOL_VERSION,
    appInfo: { name: "lora-trainer-dashboard", version: "1.0.0" },
    appCapabilities: { availableDisplayModes: ["inline"] },
  }).then(function (result) {
    applyHostContext(result && result.hostContext);
    notify("ui/notifications/initialized", {});
    new ResizeObserver(reportSize).observe(document.documentElement);
    reportSize();
  }, function (error) {
    showStatus("The host refused ui/initialize: " + error.message, true);
  });
})();
