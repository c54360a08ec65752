"""The tiny study's report opened in a real browser (Debian's headless Chromium), at a desktop and a tablet width:
every figure loads, nothing is wider than the page, every table and figure has a numbered caption, no table shows
a pandas index column and no figure is titled by its file name."""

import json
import re
import shutil
import socketserver
import subprocess
import threading

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_project")]

# Appended to a copy of the page: runs in the browser once every image has loaded or failed, and writes what it
# measured into the DOM that --dump-dom prints.
PROBE = """<script>
addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const wider = [...document.body.querySelectorAll("*")]
    .filter(e => e.getBoundingClientRect().right > width + 0.5)
    .map(e => e.tagName + " " + (e.textContent || e.getAttribute("src") || "").slice(0, 40));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    width, scrollWidth: document.documentElement.scrollWidth, wider,
    images: [...document.images].map(i => ({src: i.getAttribute("src"), alt: i.alt, loaded: i.complete && i.naturalWidth > 0})),
    tables: [...document.querySelectorAll("table")].map(t => ({
      caption: t.caption ? t.caption.textContent : null,
      headers: [...t.querySelectorAll("thead th")].map(h => h.textContent.trim())})),
    figures: [...document.querySelectorAll("figure")].map(f => (f.querySelector("figcaption") || {}).textContent || null),
  });
  document.body.appendChild(out);
});
</script>"""


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("no Chromium found: install Debian's chromium (`apt-get install chromium`; `make test` does as root)")


def open_in_browser(page, width, profile):
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                          f"--window-size={width},1000", "--virtual-time-budget=20000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the page's probe did not run: {dom[-500:]}"
    return json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


@pytest.mark.parametrize("width", [1280, 800])
def test_the_report_reads_as_a_results_section_in_a_browser(tiny_project, tmp_path, width):
    folder = tmp_path / "report"
    shutil.copytree(tiny_project.root / "artifacts/report", folder)
    page = folder / "report.html"
    page.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    seen = open_in_browser(page, width, tmp_path / "profile")

    pngs = {p.name for p in folder.glob("*.png")}
    assert {i["src"] for i in seen["images"]} == pngs and len(seen["images"]) == len(pngs) >= 6
    assert all(i["loaded"] for i in seen["images"]), [i["src"] for i in seen["images"] if not i["loaded"]]
    assert not any(i["alt"].endswith(".png") or "_" in i["alt"] for i in seen["images"])
    assert seen["scrollWidth"] <= seen["width"] and not seen["wider"], seen["wider"][:5]
    assert len(seen["tables"]) >= 8
    for n, table in enumerate(seen["tables"], 1):
        assert table["caption"] and table["caption"].startswith(f"Table {n}. ")
        assert "" not in table["headers"] and table["headers"][0] in {"init", "model", "comparison"}
    assert [f.split(".")[0] for f in seen["figures"]] == [f"Figure {n}" for n in range(1, len(pngs) + 1)]
    text = page.read_text()
    assert "differentially private for one image" in text and "secret seed" in text


DOCS_PROBE = """<script>
addEventListener("load", () => setTimeout(() => {
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    scripts: {jquery: typeof jQuery, bootstrapTable: typeof jQuery !== "undefined" && typeof jQuery.fn.bootstrapTable,
              vega: typeof vega, vegaEmbed: typeof vegaEmbed},
    rows: [...document.querySelectorAll("table tbody tr")].map(r => r.textContent.replace(/\\s+/g, " ").trim()),
  });
  document.body.appendChild(out);
}, 500));
</script>"""


# Chromium's own calls home (component updates, network time, sign-in, metrics): off where a flag turns them off.
# Debian's build still contacts these two hosts by itself (the same with a blank page): they are the browser's, not
# the page's, and are the only requests the test sets aside.
BROWSER_SERVICES = ("accounts.google.com", "update.googleapis.com")
QUIET_BROWSER = ("--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-default-apps", "--disable-domain-reliability", "--no-pings", "--disable-breakpad",
                 "--metrics-recording-only", "--disable-client-side-phishing-detection",
                 "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate,"
                 "AutofillServerCommunication,CertificateTransparencyComponentUpdater,SigninInterceptBubble")


class _CountingProxy(socketserver.ThreadingTCPServer):
    """Where the browser's every request for anything off this machine goes (and fails): it counts them."""

    daemon_threads = True

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                outer.requests.append(self.rfile.readline(2048).decode(errors="replace").strip())
                self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")

        super().__init__(("127.0.0.1", 0), Handler)


def open_offline(page, profile, proxy):
    """The DOM of ``page`` after its scripts ran, in Chromium whose network is a proxy that reaches nothing."""
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                          f"--proxy-server=http://127.0.0.1:{proxy.server_address[1]}", "--proxy-bypass-list=<-loopback>",
                          *QUIET_BROWSER,
                          "--allow-file-access-from-files", "--virtual-time-budget=20000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the page's probe did not run: {dom[-500:]}"
    return json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


def test_the_data_docs_work_offline_and_request_nothing_off_the_machine(tiny_project, tmp_path):
    """The Great Expectations Data Docs with the network unreachable: the index lists every site's validation
    (the list is built by scripts that GX would load from CDNs), and a validation page shows its expectations."""
    docs = tmp_path / "data_docs"
    shutil.copytree(tiny_project.root / "artifacts/validate/data_docs", docs)
    sites = set(tiny_project.params()["data"]["sites"])
    with _CountingProxy() as proxy:
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        index = docs / "index.html"
        index.write_text(index.read_text().replace("</body>", DOCS_PROBE + "</body>"))
        seen = open_offline(index, tmp_path / "profile", proxy)
        assert seen["scripts"] == {"jquery": "function", "bootstrapTable": "function", "vega": "object",
                                   "vegaEmbed": "function"}
        assert {site for site in sites if any(site in row for row in seen["rows"])} == sites
        private = next(n for n, site in tiny_project.params()["data"]["sites"].items() if site["role"] == "private")
        validation = next((docs / "validations" / private).rglob("*.html"))
        validation.write_text(validation.read_text().replace("</body>", DOCS_PROBE + "</body>"))
        shown = open_offline(validation, tmp_path / "profile", proxy)
        assert shown["scripts"]["jquery"] == "function"
        assert sum("must never be null" in row for row in shown["rows"]) >= 3, shown["rows"]
        proxy.shutdown()
    assert [r for r in proxy.requests if not any(host in r for host in BROWSER_SERVICES)] == []
