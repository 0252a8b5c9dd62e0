// narwhal dashboard: live updates over Server-Sent Events, the job log, line links.
// Plain JavaScript, no build step. Log text only ever reaches the page as text nodes
// (textContent / createTextNode); its colours become CSS classes (same rules as
// narwhal/web/ansi.py). Page regions are refreshed from the server's own escaped HTML.
(function () {
  "use strict";

  var TAIL = 1000;       // lines shown at first when a step opens
  var CHUNK = 5000;      // lines one request answers (narwhal.web.pages.LINES_MAX)
  var TIMELINE_MIN = 0.6; // percent: the narrowest bar (narwhal.web.timeline.MIN_WIDTH)
  var body = document.body;
  var page = body.getAttribute("data-page");
  var live = document.getElementById("live");

  // --- ANSI colours as classes --------------------------------------------------------------
  var ESCAPE = /\x1b\[([0-9;:?<=>]*)[ -\/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?|\x9b[0-9;]*[@-~]/g;
  var CONTROL = /[\x00-\x08\x0a-\x1f\x7f-\x9f]/g;

  function Style() { this.reset(); }
  Style.prototype.reset = function () {
    this.bold = this.dim = this.italic = this.underline = false; this.fg = null; this.bg = null;
  };
  Style.prototype.classes = function () {
    var out = [];
    if (this.bold) out.push("a-b");
    if (this.dim) out.push("a-d");
    if (this.italic) out.push("a-i");
    if (this.underline) out.push("a-u");
    if (this.fg !== null) out.push("a-f" + this.fg);
    if (this.bg !== null) out.push("a-g" + this.bg);
    return out.join(" ");
  };
  Style.prototype.apply = function (params) {
    var codes = params ? params.replace(/:/g, ";").split(";").map(function (p) {
      return /^[0-9]+$/.test(p) ? parseInt(p, 10) : 0;
    }) : [0];
    for (var i = 0; i < codes.length; i++) {
      var c = codes[i];
      if (c === 0) this.reset();
      else if (c === 1) this.bold = true;
      else if (c === 2) this.dim = true;
      else if (c === 3) this.italic = true;
      else if (c === 4) this.underline = true;
      else if (c === 22) this.bold = this.dim = false;
      else if (c === 23) this.italic = false;
      else if (c === 24) this.underline = false;
      else if (c >= 30 && c <= 37) this.fg = c - 30;
      else if (c >= 90 && c <= 97) this.fg = c - 90 + 8;
      else if (c === 39) this.fg = null;
      else if (c >= 40 && c <= 47) this.bg = c - 40;
      else if (c >= 100 && c <= 107) this.bg = c - 100 + 8;
      else if (c === 49) this.bg = null;
      else if (c === 38 || c === 48) {
        var mode = i + 1 < codes.length ? codes[i + 1] : null;
        if (mode === 5) {
          var n = i + 2 < codes.length ? codes[i + 2] : 0;
          var colour = n < 16 ? n : null;
          if (c === 38) this.fg = colour; else this.bg = colour;
          i += 2;
        } else if (mode === 2) {
          if (c === 38) this.fg = null; else this.bg = null;
          i += 4;
        }
      }
    }
  };

  function runs(line) {
    var style = new Style(), out = [], pos = 0, m;
    function add(cls, text) {
      text = text.replace(CONTROL, "");
      if (!text) return;
      if (out.length && out[out.length - 1][0] === cls) out[out.length - 1][1] += text;
      else out.push([cls, text]);
    }
    ESCAPE.lastIndex = 0;
    while ((m = ESCAPE.exec(line)) !== null) {
      if (m[0] === "") { ESCAPE.lastIndex++; continue; }
      if (m.index > pos) add(style.classes(), line.slice(pos, m.index));
      if (m[2] === "m") style.apply(m[1]);
      pos = m.index + m[0].length;
    }
    if (pos < line.length) add(style.classes(), line.slice(pos));
    return out;
  }

  function lineNode(n, kind, text) {
    var div = document.createElement("div");
    div.className = kind === "narwhal" ? "ln nw" : "ln";
    div.id = "L" + n;
    var a = document.createElement("a");
    a.className = "n";
    a.href = "#L" + n;
    a.textContent = String(n);
    var t = document.createElement("span");
    t.className = "t";
    if (kind === "narwhal") {
      var who = document.createElement("span");
      who.className = "vh";
      who.textContent = "narwhal: ";
      t.appendChild(who);
    }
    runs(text).forEach(function (run) {
      if (run[0]) {
        var s = document.createElement("span");
        s.className = run[0];
        s.textContent = run[1];
        t.appendChild(s);
      } else {
        t.appendChild(document.createTextNode(run[1]));
      }
    });
    div.appendChild(a);
    div.appendChild(t);
    return div;
  }

  window.narwhal = {runs: runs, lineNode: lineNode}; // for the tests: the same rules as the server's

  function statusNode(value) {
    var symbols = {queued: "○", running: "◐", passed: "✓", failed: "✗", error: "!", cancelled: "⊘",
                   skipped: "–", pending: "·"};
    var st = document.createElement("span");
    st.className = "st st-" + value;
    var sym = document.createElement("span");
    sym.className = "sym";
    sym.setAttribute("aria-hidden", "true");
    sym.textContent = symbols[value] || "?";
    st.appendChild(sym);
    st.appendChild(document.createTextNode(" " + value));
    return st;
  }

  // --- live state and region refreshes -----------------------------------------------------
  function setLive(on) {
    if (!live) return;
    var state = on ? "on" : "off";
    if (live.getAttribute("data-state") === state) return;
    live.setAttribute("data-state", state);
    live.textContent = on ? "Live updates: on" : "Live updates: reconnecting…";
  }

  var refreshTimer = null, lastRefresh = 0;
  function scheduleRefresh() {
    if (refreshTimer !== null) return;
    var wait = Math.max(250, 1000 - (Date.now() - lastRefresh));
    refreshTimer = setTimeout(refresh, wait);
  }

  function refresh() {
    refreshTimer = null;
    lastRefresh = Date.now();
    var targets = document.querySelectorAll("[data-refresh]");
    if (!targets.length) return;
    fetch(location.pathname + location.search, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (text === null) return;
        var doc = new DOMParser().parseFromString(text, "text/html");
        Array.prototype.forEach.call(targets, function (el) {
          var fresh = doc.getElementById(el.id);
          if (!fresh) return;
          var active = document.activeElement, key = null;
          if (active && el.contains(active)) key = active.getAttribute("href") || active.getAttribute("name");
          var node = document.adoptNode(fresh);
          el.replaceWith(node);
          if (key) {
            var same = node.querySelector('[href="' + CSS.escape(key) + '"], [name="' + CSS.escape(key) + '"]');
            if (same) same.focus();
          }
        });
      })
      .catch(function () { /* the next event tries again */ });
  }

  // Streams are closed when the page is hidden: a page kept in the back-forward cache would
  // otherwise hold its connections, and a browser allows only six per host over HTTP/1.1.
  var streams = [];
  function openStream(url) {
    var es = new EventSource(url);
    streams.push(es);
    return es;
  }
  window.addEventListener("pagehide", function () {
    streams.forEach(function (es) { es.close(); });
    streams = [];
  });
  window.addEventListener("pageshow", function (e) { if (e.persisted) location.reload(); });

  var KINDS = ["job.queued", "job.started", "job.finished", "job.step", "runner.health", "reset"];

  function followEvents(handler) {
    if (!window.EventSource) return;
    var es = openStream("/events");
    es.addEventListener("open", function () { setLive(true); });
    es.addEventListener("ready", function () { setLive(true); });
    es.addEventListener("error", function () { setLive(false); });
    KINDS.forEach(function (kind) {
      es.addEventListener(kind, function (e) {
        setLive(true);
        var data = {};
        try { data = JSON.parse(e.data); } catch (err) { /* keep {} */ }
        handler(kind, data);
      });
    });
    return es;
  }

  // --- the job page's log -----------------------------------------------------------------------
  function jobPage() {
    var log = document.getElementById("log");
    if (!log) return;
    var jobId = log.getAttribute("data-job");
    var total = parseInt(log.getAttribute("data-total"), 10) || 0;
    var final = log.getAttribute("data-final") === "1";
    var follow = document.getElementById("follow");
    var status = body.getAttribute("data-status");
    var attempt = body.getAttribute("data-attempt");
    // Steps side by side (a graph pipeline): their line ranges overlap, and each section shows
    // the lines that are its own (the same rule as narwhal/web/owner.py).
    var owned = log.getAttribute("data-owned") === "1";
    function num(sec, name) {
      var v = sec.getAttribute("data-" + name);
      return v ? parseInt(v, 10) : null;
    }
    function setNum(sec, name, value) { sec.setAttribute("data-" + name, value === null ? "" : String(value)); }
    function sections() { return Array.prototype.slice.call(log.querySelectorAll("details.sec")); }
    function sectionFor(n) {
      var found = null;
      sections().forEach(function (s) {
        var first = num(s, "first"), last = num(s, "last");
        if (first !== null && first <= n && (last === null || n <= last)) found = s;
      });
      return found;
    }

    function ownSection(n, kind, text) {
      var steps = sections().filter(function (s) { return num(s, "idx") >= 0; });
      var byLength = steps.slice().sort(function (a, b) {
        return b.getAttribute("data-name").length - a.getAttribute("data-name").length;
      });
      for (var i = 0; i < byLength.length; i++) {
        var name = byLength[i].getAttribute("data-name");
        var stopping = " in step " + name + "; stopping it";
        if (kind === "narwhal") {
          if (text.indexOf("step " + name + " ") === 0 || text.indexOf("step " + name + ":") === 0 ||
              text.indexOf("stopping " + name + ":") === 0 || text.slice(-stopping.length) === stopping) {
            return byLength[i];
          }
        } else if (text.indexOf(name + " | ") === 0) {
          return byLength[i];
        }
      }
      var found = null, foundFirst = -1;
      steps.forEach(function (s) {
        var first = num(s, "first"), last = num(s, "last");
        if (first !== null && first <= n && (last === null || n <= last) && first >= foundFirst) {
          found = s; foundFirst = first;
        }
      });
      return found || sectionFor(n);
    }

    function fetchLines(from, to, idx) {
      var url = "/ui/jobs/" + jobId + "/lines?from=" + from + "&to=" + to;
      if (owned && typeof idx === "number" && idx >= 0) url += "&step=" + idx;
      return fetch(url, {credentials: "same-origin"}).then(function (r) {
        if (!r.ok) throw new Error("lines: " + r.status);
        return r.json();
      });
    }

    function fetchRange(from, to, idx) {
      var all = [];
      function next(start) {
        if (start > to) return Promise.resolve(all);
        return fetchLines(start, Math.min(to, start + CHUNK - 1), idx).then(function (data) {
          var lines = data.lines;
          all = all.concat(lines);
          if (data.next) return next(data.next);  // a step's own lines: where the window ended
          if (!lines.length) return all;
          return next(lines[lines.length - 1][0] + 1);
        });
      }
      return next(from);
    }

    function fragment(lines) {
      var frag = document.createDocumentFragment();
      lines.forEach(function (l) { frag.appendChild(lineNode(l[0], l[1], l[2])); });
      return frag;
    }

    function updateOlder(sec) {
      var button = sec.querySelector("button.older");
      var lo = num(sec, "lo"), first = num(sec, "first");
      button.hidden = !(lo !== null && first !== null && lo > first);
    }

    function ensureLoaded(sec) {
      if (sec._loading) return sec._loading;
      var first = num(sec, "first");
      if (num(sec, "hi") !== null || first === null) return Promise.resolve();
      var last = num(sec, "last");
      var end = last !== null ? last : total;
      if (end < first) return Promise.resolve();
      var lo = Math.max(first, end - TAIL + 1);
      var idx = num(sec, "idx");
      sec._loading = fetchRange(lo, end, idx).then(function (lines) {
        if (owned && idx >= 0 && num(sec, "hi") === null) {
          sec.querySelector(".lines").appendChild(fragment(lines));
          setNum(sec, "lo", lo);
          setNum(sec, "hi", end);
        } else if (num(sec, "hi") === null && lines.length) {
          sec.querySelector(".lines").appendChild(fragment(lines));
          setNum(sec, "lo", lines[0][0]);
          setNum(sec, "hi", lines[lines.length - 1][0]);
        }
        updateOlder(sec);
      }).finally(function () { sec._loading = null; });
      return sec._loading;
    }

    function loadOlder(sec, count) {
      var lo = num(sec, "lo"), first = num(sec, "first");
      if (lo === null || first === null || lo <= first) return Promise.resolve();
      var from = Math.max(first, lo - (count || CHUNK));
      var idx = num(sec, "idx");
      var own = owned && idx >= 0;
      return fetchRange(from, lo - 1, idx).then(function (lines) {
        if (own) setNum(sec, "lo", from);
        if (!lines.length) { updateOlder(sec); return; }
        var box = sec.querySelector(".lines");
        var anchor = box.firstChild;
        var before = anchor ? anchor.getBoundingClientRect().top : 0;
        box.insertBefore(fragment(lines), anchor);
        if (!own) setNum(sec, "lo", lines[0][0]);
        if (anchor) window.scrollBy(0, anchor.getBoundingClientRect().top - before);
        updateOlder(sec);
      });
    }

    log.addEventListener("toggle", function (e) {
      var sec = e.target;
      if (sec.matches && sec.matches("details.sec") && sec.open) ensureLoaded(sec);
    }, true);
    log.addEventListener("click", function (e) {
      var button = e.target.closest ? e.target.closest("button.older") : null;
      if (!button) return;
      var sec = button.closest("details.sec");
      loadOlder(sec).then(function () {
        if (button.hidden) {
          var first = sec.querySelector(".lines .ln a.n");
          if (first) first.focus();
        }
      });
    });

    // Live lines: batched per animation frame, appended only where they continue what is shown.
    var pending = [];
    function flush() {
      var batch = pending;
      pending = [];
      var groups = [];
      batch.forEach(function (l) {
        var sec = owned ? ownSection(l[0], l[1], l[2]) : sectionFor(l[0]);
        if (!sec) return;
        var hi = num(sec, "hi"), first = num(sec, "first");
        if (owned && num(sec, "idx") >= 0) {
          // Its own lines are not consecutive: any line after what is shown continues it.
          if (hi === null && sec.open && first !== null && l[0] >= first) hi = l[0] - 1;
          if (hi === null || l[0] <= hi) return;
        } else {
          if (hi === null && sec.open && l[0] === first) hi = first - 1;
          if (hi === null || l[0] !== hi + 1) return;
        }
        if (num(sec, "lo") === null) setNum(sec, "lo", l[0]);
        setNum(sec, "hi", l[0]);
        var group = groups.length && groups[groups.length - 1].sec === sec ? groups[groups.length - 1] : null;
        if (!group) { group = {sec: sec, frag: document.createDocumentFragment()}; groups.push(group); }
        group.frag.appendChild(lineNode(l[0], l[1], l[2]));
      });
      var lastNode = null;
      groups.forEach(function (g) {
        g.sec.querySelector(".lines").appendChild(g.frag);
        lastNode = g.sec.querySelector(".lines").lastChild;
      });
      if (lastNode && follow && follow.checked) lastNode.scrollIntoView({block: "end"});
    }
    function queue(n, kind, text) {
      total = Math.max(total, n);
      if (!pending.length) requestAnimationFrame(flush);
      pending.push([n, kind, text]);
    }

    if (!final && window.EventSource) {
      var stream = openStream("/jobs/" + jobId + "/log?follow=1&after=" + total);
      stream.addEventListener("message", function (e) { queue(parseInt(e.lastEventId, 10), "step", e.data); });
      stream.addEventListener("narwhal", function (e) { queue(parseInt(e.lastEventId, 10), "narwhal", e.data); });
      stream.addEventListener("end", function () { stream.close(); final = true; scheduleRefresh(); });
    }

    function stepChanged(data) {
      var sec = document.getElementById("step-" + data.idx);
      if (!sec || String(data.attempt) !== attempt) return;
      if (data.status === "running") {
        setNum(sec, "first", data.line);
        if (!owned) sections().forEach(function (s) {
          var f = num(s, "first");
          if (s !== sec && f !== null && f < data.line && num(s, "last") === null) setNum(s, "last", data.line - 1);
        });
        if (follow && follow.checked && !sec.open) { sec.open = true; }
      } else if (data.status !== "pending") {
        if (num(sec, "first") !== null) setNum(sec, "last", data.line - 1);
      }
      var holder = sec.querySelector(".sec-status");
      if (holder) { holder.textContent = ""; holder.appendChild(statusNode(data.status)); }
    }

    followEvents(function (kind, data) {
      if (kind === "reset") { scheduleRefresh(); return; }
      if (String(data.id) !== jobId || kind === "runner.health") return;
      if (kind === "job.step") { stepChanged(data); scheduleRefresh(); return; }
      var plan = status === "queued" && kind === "job.started";
      var again = kind === "job.queued" && status !== "queued";
      if (plan || again) { location.reload(); return; }  // a new attempt: its steps are a new plan
      status = data.status;
      body.setAttribute("data-status", status);
      scheduleRefresh();
    });

    // The steps' timeline of a running job: its bars are stretched every second between the
    // refreshes, from the server's own numbers (narwhal/web/timeline.py) and the time since.
    function tickTimeline() {
      var table = document.getElementById("steps");  // replaced by each refresh of the head
      if (!table || table.getAttribute("data-running") !== "1") return;
      if (!table._shownAt) table._shownAt = Date.now();
      var total = parseFloat(table.getAttribute("data-total")) + (Date.now() - table._shownAt) / 1000;
      if (!(total > 0)) return;
      Array.prototype.forEach.call(table.querySelectorAll("svg.tl"), function (svg) {
        var rect = svg.querySelector("rect");
        var start = parseFloat(svg.getAttribute("data-start"));
        var end = svg.getAttribute("data-end") ? parseFloat(svg.getAttribute("data-end")) : total;
        if (!rect || isNaN(start) || isNaN(end)) return;
        var x = Math.min(100 * start / total, 100 - TIMELINE_MIN);
        var width = Math.min(Math.max(TIMELINE_MIN, 100 * (end - start) / total), 100 - x);
        rect.setAttribute("x", x.toFixed(3) + "%");
        rect.setAttribute("width", width.toFixed(3) + "%");
      });
    }
    setInterval(tickTimeline, 1000);
    function showHash() {
      var m = /^#L([0-9]+)$/.exec(location.hash);
      if (!m) return;
      var n = parseInt(m[1], 10);
      if (follow) follow.checked = false;
      var el = document.getElementById("L" + n);
      function reveal(sec) {
        if (!sec) return null;
        sec.open = true;
        return ensureLoaded(sec).then(function more() {
          if (document.getElementById("L" + n)) return;
          var lo = num(sec, "lo"), first = num(sec, "first");
          if (lo === null || first === null || lo <= first || lo <= n) return;
          return loadOlder(sec, lo - n + 50).then(more);
        });
      }
      var ready = Promise.resolve();
      if (!el && owned) {
        ready = fetchLines(n, n).then(function (data) {  // whose it is depends on what it says
          var line = data.lines[0];
          return line ? reveal(ownSection(line[0], line[1], line[2])) : null;
        });
      } else if (!el) {
        ready = Promise.resolve(reveal(sectionFor(n)));
      }
      ready.then(function () {
        var target = document.getElementById("L" + n);
        if (!target) return;
        // :target is not re-matched for a line loaded after the navigation: a class marks it.
        Array.prototype.forEach.call(log.querySelectorAll(".ln.target"), function (el) { el.classList.remove("target"); });
        target.classList.add("target");
        target.scrollIntoView({block: "center"});
        target.querySelector("a").focus({preventScroll: true});
      });
    }
    window.addEventListener("hashchange", showHash);
    showHash();
  }

  // --- pages ---------------------------------------------------------------------------------------
  if (page === "job") {
    jobPage();
  } else if (page === "overview" || page === "repo" || page === "runner") {
    followEvents(function () { scheduleRefresh(); });
  }
}());
