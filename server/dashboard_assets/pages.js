/* The web dashboard's pages (not the MCP App): shell.html says which in <body data-page>, this script fills
   <main> from the JSON routes (server/http/dashboard.py) and keeps it live from one EventSource per tab:
   a `job` event carries a JobRow; the jobs page updates that row, a job page refetches its view (at most one
   fetch a second however many events arrive: a running job sends one a step). A 401 anywhere means the session is gone:
   back to the login at /. Classic script, loaded after charts.js and job_view.js. */
(function () {
  "use strict";
  var LD = window.LoraDashboard;
  var h = LD.dom.h, setText = LD.dom.setText, format = LD.format;
  var body = document.body, main = document.getElementById("main");
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";

  function LoggedOut() {
    this.message = "logged out";
  }

  /* fetch for the dashboard's routes: JSON back, the server's error message thrown, a 401 to the login. */
  function api(path, options) {
    options = options || {};
    var init = { method: options.method || "GET", credentials: "same-origin", headers: { Accept: "application/json" },
      redirect: options.redirect || "follow" };
    if (init.method !== "GET") init.headers["X-CSRF-Token"] = csrf;
    return fetch(path, init).then(function (response) {
      if (response.status === 401) {
        window.location.assign("/");
        throw new LoggedOut();
      }
      return response.json().catch(function () { return {}; }).then(function (data) {
        if (!response.ok) throw new Error(data.error && data.error.message ? data.error.message : response.statusText);
        return data;
      });
    });
  }

  function segments(path) {
    return path.split("/").map(encodeURIComponent).join("/");
  }

  function showError(error) {
    if (error instanceof LoggedOut) return;
    main.replaceChildren(h("p", { "class": "error", role: "alert" }, [error.message || String(error)]));
  }

  function sizeText(bytes) {
    var units = ["B", "KB", "MB", "GB", "TB"], i = 0;
    while (bytes >= 1000 && i < units.length - 1) {
      bytes /= 1000;
      i++;
    }
    return (i ? bytes.toFixed(1) : String(bytes)) + " " + units[i];
  }

  // ---- jobs page --------------------------------------------------------------------------------------------

  var jobRows = {};

  function jobAction(row, action) {
    return api("/dashboard/api/jobs/" + encodeURIComponent(row.job_id) + "/" + action, { method: "POST" });
  }

  /* The row's cells, updated in place; the buttons follow can_stop / can_resume. */
  function fillJobRow(tr, row) {
    var c = tr.__cells;
    tr.setAttribute("data-state", row.state);
    tr.__row = row;
    setText(c.config, row.config_name);
    setText(c.kind, row.kind);
    setText(c.state, row.state);
    c.state.className = "state state-" + row.state;
    LD.dom.setProgress(c.bar, row.percent);
    setText(c.progressText, format.progress(row));
    setText(c.eta, row.eta_s === null || row.eta_s === undefined ? "–" : format.duration(row.eta_s));
    setText(c.devices, format.devices(row.devices));
    setText(c.loss, row.loss === null || row.loss === undefined ? "–" : LD.charts.formatValue(row.loss));
    LD.dom.setChildren(c.actions, [row.can_stop && c.stop, row.can_resume && c.resume, c.message].filter(Boolean));
    c.error.hidden = !row.error;
    setText(c.error, row.error || "");
    c.error.setAttribute("title", row.error || "");
  }

  /* After the action the table is reloaded (`reload`: the overview, cheap): the action's answer is a JobStatus,
     whose can_stop / can_resume the server decides, and the other rows may have moved too (a queued job starts). */
  function actionButton(tr, cls, label, action, reload) {
    var button = h("button", { type: "button", "class": cls }, [label]);
    button.addEventListener("click", function () {
      button.disabled = true;
      setText(tr.__cells.message, "");
      jobAction(tr.__row, action)
        .then(reload)
        .catch(function (error) { if (!(error instanceof LoggedOut)) setText(tr.__cells.message, error.message); })
        .then(function () { button.disabled = false; });
    });
    return button;
  }

  function jobRow(row, reload) {
    var tr = h("tr", { "data-job-id": row.job_id });
    var link = h("a", { href: "/dashboard/jobs/" + encodeURIComponent(row.job_id) });
    var c = tr.__cells = {
      config: h("span", { "class": "config" }), jobId: h("span", { "class": "job-id muted" }, [row.job_id]),
      kind: h("td", { "class": "kind" }), state: h("td", { "class": "state" }),
      bar: h("progress", { max: "100" }), progressText: h("span", { "class": "progress-text" }),
      eta: h("td", { "class": "eta" }), devices: h("td", { "class": "devices" }), loss: h("td", { "class": "loss" }),
      error: h("p", { "class": "error", hidden: true }), message: h("span", { "class": "error", role: "alert" }),
      actions: h("td", { "class": "actions" })
    };
    c.stop = actionButton(tr, "stop", "Stop", "stop", reload);
    c.resume = actionButton(tr, "resume", "Resume", "resume", reload);
    link.appendChild(c.config);
    tr.append(
      h("td", { "class": "job" }, [link, h("br"), c.jobId, c.error]), c.kind, c.state,
      h("td", { "class": "progress" }, [c.bar, c.progressText]), c.eta, c.devices, c.loss,
      c.actions
    );
    fillJobRow(tr, row);
    return tr;
  }

  /* A row for a job the table has, or a new one at the top (the newest job). */
  function upsertJob(tbody, row, reload) {
    var tr = jobRows[row.job_id];
    if (tr) {
      fillJobRow(tr, row);
      return;
    }
    tr = jobRows[row.job_id] = jobRow(row, reload);
    tbody.insertBefore(tr, tbody.firstChild);
    var empty = tbody.querySelector("tr.empty");
    if (empty) empty.remove();
  }

  function jobsPage() {
    document.title = "Jobs · lora-mcp";
    var tbody = h("tbody");
    var table = h("table", { id: "jobs", "class": "jobs" }, [
      h("thead", {}, [h("tr", {}, ["Job", "Kind", "State", "Progress", "ETA", "Devices", "Loss", ""].map(function (t) {
        return h("th", { scope: "col" }, [t]);
      }))]), tbody]);
    function load() {
      return api("/dashboard/api/jobs").then(function (overview) {
        overview.jobs.slice().reverse().forEach(function (row) { upsertJob(tbody, row, load); });
        if (!overview.jobs.length && !tbody.firstChild) {
          tbody.appendChild(h("tr", { "class": "empty" }, [h("td", { colspan: "8", "class": "muted" },
            ["No jobs yet: start-training from the chat starts one."])]));
        }
      });
    }

    return load().then(function () {
      main.replaceChildren(h("h1", {}, ["Jobs"]), table);
      return { job: function (row) { upsertJob(tbody, row, load); }, resync: load };
    });
  }

  // ---- job page ---------------------------------------------------------------------------------------------

  // A job page's refetches, at most one a second: a state change still shows within ~1 s plus a fetch (the job
  // monitor sends it within its 1 s tick), while a run of 20 steps a second costs one fetch a second, not 20.
  var REFETCH_MS = 1000;

  function jobPage(jobId) {
    document.title = jobId + " · lora-mcp";
    var root = h("div", { id: "job" });
    var path = "/dashboard/api/jobs/" + encodeURIComponent(jobId);
    var hooks = {
      // A load after the first (a failed one, a sample rendered again after a resume) gets its own URL: the
      // image cache would answer the same URL with the old picture.
      sampleSrc: function (filename, attempt) {
        return Promise.resolve("/dashboard/files/samples/" + encodeURIComponent(jobId) + "/" +
          encodeURIComponent(filename) + (attempt > 1 ? "?attempt=" + attempt : ""));
      },
      stop: function () { return api(path + "/stop", { method: "POST" }).then(refresh); },
      resume: function () { return api(path + "/resume", { method: "POST" }).then(refresh); }
    };
    var inFlight = null, next = null, lastStart = 0;

    function load() {
      lastStart = Date.now();
      return api(path).then(function (view) {
        if (!root.parentNode) main.replaceChildren(root);
        LD.renderJob(root, view, hooks);
        document.title = view.row.config_name + " (" + view.row.state + ") · lora-mcp";
      });
    }

    /* One fetch in flight and one waiting, each started REFETCH_MS after the one before: a job's event comes
       every step, a fetch builds the whole view. The returned promise ends when a fetch started after the call
       has drawn its view (an action's button waits for it). */
    function refresh() {
      if (!next) {
        next = Promise.resolve(inFlight).then(function () {
          var wait = lastStart + REFETCH_MS - Date.now();
          return wait > 0 ? new Promise(function (resolve) { window.setTimeout(resolve, wait); }) : null;
        }).then(function () {
          next = null;
          inFlight = load().catch(showError).then(function () { inFlight = null; });
          return inFlight;
        });
      }
      return next;
    }

    return load().then(function () {
      return { job: function (row) { if (row.job_id === jobId) refresh(); }, resync: refresh };
    });
  }

  // ---- datasets ---------------------------------------------------------------------------------------------

  function datasetsPage() {
    document.title = "Datasets · lora-mcp";
    return api("/dashboard/api/datasets").then(function (overview) {
      var rows = overview.datasets.map(function (d) {
        return h("tr", { "data-dataset": d.name }, [
          h("td", {}, [h("a", { href: "/dashboard/datasets/" + encodeURIComponent(d.name) }, [d.name])]),
          h("td", { "class": "number" }, [String(d.images)]),
          h("td", { "class": "number" }, [String(d.captioned)]),
          h("td", { "class": "number" }, [sizeText(d.size_bytes)])
        ]);
      });
      if (!rows.length) {
        rows.push(h("tr", { "class": "empty" }, [h("td", { colspan: "4", "class": "muted" },
          ["No datasets yet: upload-dataset or import-dataset from the chat adds one."])]));
      }
      main.replaceChildren(h("h1", {}, ["Datasets"]), h("table", { id: "datasets", "class": "datasets" }, [
        h("thead", {}, [h("tr", {}, ["Dataset", "Images", "Captioned", "Size"].map(function (t) {
          return h("th", { scope: "col" }, [t]);
        }))]), h("tbody", {}, rows)]));
    });
  }

  /* A report field as text: {"512x512": 3} as "512x512: 3", [w, h] as "w, h", groups of names as "a, b; c, d". */
  function reportValue(value) {
    if (Array.isArray(value)) {
      return value.map(function (item) { return Array.isArray(item) ? item.join(", ") : reportValue(item); })
        .join(Array.isArray(value[0]) || typeof value[0] === "object" ? "; " : ", ");
    }
    if (value !== null && typeof value === "object") {
      return Object.keys(value).map(function (key) { return key + ": " + reportValue(value[key]); }).join(", ");
    }
    return String(value);
  }

  /* The report as definition lists: the verdict and problems first, then every other field as it is. */
  function reportView(report) {
    var problems = report.problems || [];
    var list = h("dl", { "class": "facts" });
    Object.keys(report).forEach(function (key) {
      if (key === "problems" || key === "verdict") return;
      var value = report[key];
      if (Array.isArray(value) && !value.length) return;
      list.append(h("dt", {}, [key.replace(/_/g, " ")]), h("dd", {}, [reportValue(value)]));
    });
    return h("section", { id: "report", "class": "report" }, [
      h("h2", {}, ["Inspection"]),
      h("p", { "class": "verdict" }, [report.verdict || ""]),
      problems.length ? h("ul", { "class": "problems" }, problems.map(function (p) { return h("li", {}, [p]); }))
        : h("p", { "class": "muted" }, ["No problems found."]),
      list
    ]);
  }

  function datasetPage(name) {
    document.title = name + " · lora-mcp";
    return api("/dashboard/api/datasets/" + encodeURIComponent(name)).then(function (view) {
      var figures = view.images.map(function (image) {
        var img = h("img", { "class": "thumb", alt: image.filename, decoding: "async",
          src: "/dashboard/files/thumbnails/" + encodeURIComponent(name) + "/" + segments(image.filename) });
        return h("figure", { "class": "image", "data-filename": image.filename }, [img,
          h("figcaption", { "class": "caption" }, [
            h("span", { "class": "filename muted" }, [image.filename + " · " + image.width + "×" + image.height]),
            h("span", { "class": image.caption ? "text" : "text muted" }, [image.caption || "(no caption)"])
          ])]);
      });
      main.replaceChildren(h("div", { id: "dataset", "data-dataset": name }, [
        h("h1", {}, [name]), reportView(view.report), h("h2", {}, ["Images"]),
        h("div", { "class": "gallery" }, figures)
      ]));
    });
  }

  // ---- live updates -----------------------------------------------------------------------------------------

  var live = document.getElementById("live");

  function setLive(state) {
    live.setAttribute("data-state", state);
    setText(live, state);
  }

  var source = null, subscriber = null;
  var RETRY_MS = 3000;

  /* One EventSource for the tab; `page` ({job(row), resync()}, or null) takes its events. Each `open`, the
     first included, resyncs the page: the page loaded its data before the stream was open, and an event in
     between (a job that ended) would be lost. The browser reconnects by itself after a network error, and
     the page then catches up on the events it missed the same way. A refused stream (an expired session
     answers 401) closes it: a plain fetch then finds out and goes to the login, or the stream is tried again. */
  function connect(page) {
    if (source) source.close();
    subscriber = page;
    source = new EventSource("/dashboard/events");
    source.addEventListener("open", function () {
      setLive("live");
      if (page) Promise.resolve(page.resync()).catch(showError);
    });
    source.addEventListener("job", function (event) {
      if (page) page.job(JSON.parse(event.data));
    });
    source.addEventListener("error", function () {
      setLive("reconnecting");
      if (source.readyState !== EventSource.CLOSED) return;
      var closed = source;
      var retry = function () {
        window.setTimeout(function () { if (source === closed) connect(page); }, RETRY_MS);
      };
      api("/dashboard/api/jobs").then(retry, function (error) { if (!(error instanceof LoggedOut)) retry(); });
    });
  }

  // Leaving the page closes the stream; coming back to it from the back/forward cache (persisted) opens
  // it again, and that open resyncs the page frozen meanwhile.
  window.addEventListener("pagehide", function () {
    if (source) source.close();
    setLive("reconnecting");
  });
  window.addEventListener("pageshow", function (event) {
    if (event.persisted && source) connect(subscriber);
  });

  document.getElementById("logout").addEventListener("click", function () {
    // "manual": the answer's redirect to the login is followed by the page, not by fetch.
    api("/dashboard/logout", { method: "POST", redirect: "manual" }).catch(function () { return null; })
      .then(function () { window.location.assign("/"); });
  });

  var pages = {
    jobs: jobsPage,
    job: function () { return jobPage(body.getAttribute("data-job-id")); },
    datasets: datasetsPage,
    dataset: function () { return datasetPage(body.getAttribute("data-dataset")); }
  };
  var page = pages[body.getAttribute("data-page")] || jobsPage;
  page().then(function (subscriber) { connect(subscriber || null); }, function (error) {
    if (error instanceof LoggedOut) return;
    showError(error);
    connect(null);
  });
})();
