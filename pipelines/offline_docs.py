"""Data Docs that work without the internet: Great Expectations' pages with their web assets vendored from npm.

GX's Data Docs load bootstrap, bootstrap-table, jQuery, vega and Font Awesome from public CDNs, and the list of
validations on the index page is built by those scripts: opened on a hospital network cut off from the internet,
the index is empty. ``fetch_assets`` downloads the same files from the npm registry once per machine (``make
setup``; each tarball checked against the registry's SHA-512 integrity) into a cache; ``vendor`` copies them into a
rendered site's ``static/vendor/`` and points every page at its copies, so no request leaves the machine.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"
CACHE_ENV = "DP_CXR_WEB_ASSETS"


@dataclass(frozen=True)
class Asset:
    """One file a Data Docs page loads: the URL GX writes, and where the npm package holds the same file.

    Attributes:
        url: the URL as it appears in the pages (a prefix: query strings are dropped).
        package: the npm package.
        version: its exact version (the CDN's version, or the newest of the major version it names).
        path: the file inside the package.
        tree: a folder of the package the file refers to relatively (Font Awesome's webfonts), copied with it.
    """

    url: str
    package: str
    version: str
    path: str
    tree: str = ""


ASSETS = (
    Asset("https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css", "bootstrap", "4.3.1",
          "dist/css/bootstrap.min.css"),
    Asset("https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js", "bootstrap", "4.3.1",
          "dist/js/bootstrap.min.js"),
    Asset("https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css",
          "@forevolve/bootstrap-dark", "1.1.0", "dist/css/bootstrap-prefers-dark.css"),
    Asset("https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css", "bootstrap-table", "1.19.1",
          "dist/bootstrap-table.min.css"),
    Asset("https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js", "bootstrap-table", "1.19.1",
          "dist/bootstrap-table.min.js"),
    Asset("https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control"
          ".min.css", "bootstrap-table", "1.19.1", "dist/extensions/filter-control/bootstrap-table-filter-control"
          ".min.css"),
    Asset("https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control"
          ".css", "bootstrap-table", "1.19.1", "dist/extensions/filter-control/bootstrap-table-filter-control.css"),
    Asset("https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control"
          ".min.js", "bootstrap-table", "1.19.1", "dist/extensions/filter-control/bootstrap-table-filter-control"
          ".min.js"),
    Asset("https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css",
          "bootstrap-datepicker", "1.9.0", "dist/css/bootstrap-datepicker.min.css"),
    Asset("https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js",
          "bootstrap-datepicker", "1.9.0", "dist/js/bootstrap-datepicker.min.js"),
    Asset("https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css", "@fortawesome/fontawesome-free",
          "6.6.0", "css/all.min.css", tree="webfonts"),
    Asset("https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js", "popper.js", "1.12.9",
          "dist/umd/popper.min.js"),
    Asset("https://code.jquery.com/jquery-3.7.1.min.js", "jquery", "3.7.1", "dist/jquery.min.js"),
    Asset("https://cdn.jsdelivr.net/npm/vega@5", "vega", "5.30.0", "build/vega.min.js"),
    Asset("https://cdn.jsdelivr.net/npm/vega-lite@5", "vega-lite", "5.21.0", "build/vega-lite.min.js"),
    Asset("https://cdn.jsdelivr.net/npm/vega-embed@6", "vega-embed", "6.26.0", "build/vega-embed.min.js"),
)
# GX's logo on its S3 bucket: replaced by the title text the page already has beside it.
LOGO = re.compile(r'src="https://great-expectations-web-assets\.s3[^"]*"')
# What a page loads by itself (scripts, stylesheets, images); links a reader may click are left as they are.
REMOTE = re.compile(r'(<(?:script|link|img)\b[^>]*?\b(?:src|href)=")(https?://[^"]+)"')


class AssetsUnavailable(RuntimeError):
    """The web assets are neither cached nor downloadable from the npm registry."""


def asset_cache() -> Path:
    """Where the downloaded assets live: ``$DP_CXR_WEB_ASSETS``, else ``.cache/web-assets`` of the working folder."""
    return Path(os.environ.get(CACHE_ENV) or Path.cwd() / ".cache" / "web-assets")


def fetch_assets(cache: Path | None = None) -> Path:
    """Downloads every package's files into ``cache`` (nothing when they are there); returns the cache.

    Raises:
        AssetsUnavailable: the registry cannot be reached, or a tarball does not match its integrity hash.
    """
    cache = cache or asset_cache()
    for package, version in sorted({(a.package, a.version) for a in ASSETS}):
        folder = cache / f"{package}@{version}"
        wanted = [a for a in ASSETS if (a.package, a.version) == (package, version)]
        if all((folder / a.path).is_file() for a in wanted):
            continue
        try:
            with urllib.request.urlopen(f"{REGISTRY}/{package}/{version}", timeout=60) as answer:
                dist = json.load(answer)["dist"]
            with urllib.request.urlopen(dist["tarball"], timeout=120) as answer:
                tarball = answer.read()
        except OSError as error:
            raise AssetsUnavailable(f"cannot download {package}@{version} from {REGISTRY} ({error})") from None
        algorithm, _, expected = dist["integrity"].partition("-")
        if base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode() != expected:
            raise AssetsUnavailable(f"{package}@{version} from {REGISTRY} does not match its {algorithm} integrity")
        keep = {a.path for a in wanted} | {a.tree for a in wanted if a.tree}
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(tarball)) as archive:
            for member in archive.getmembers():
                inside = member.name.removeprefix("package/")
                if member.isfile() and any(inside == k or inside.startswith(k + "/") for k in keep):
                    target = partial / inside
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.extractfile(member).read())
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    return cache


def vendor(site: Path, cache: Path | None = None) -> int:
    """Copies the assets into ``site/static/vendor`` and points every HTML page of the site at them.

    Returns:
        How many references were rewritten.

    Raises:
        AssetsUnavailable: the assets could not be fetched, or a page loads a remote file this module does not know
            (a new Great Expectations version: add it to ``ASSETS``).
    """
    cache = fetch_assets(cache)
    vendored = site / "static" / "vendor"
    rewritten = 0
    for asset in ASSETS:
        source, target = cache / f"{asset.package}@{asset.version}", vendored / f"{asset.package}@{asset.version}"
        for part in (asset.path, asset.tree):
            if part and not (target / part).exists():
                (target / part).parent.mkdir(parents=True, exist_ok=True)
                copy = shutil.copytree if (source / part).is_dir() else shutil.copyfile
                copy(source / part, target / part)
    for page in site.rglob("*.html"):
        html = LOGO.sub('src="data:," hidden', page.read_text())
        html, count = REMOTE.subn(functools.partial(_local, page=page, prefix=os.path.relpath(vendored, page.parent)),
                                  html)
        page.write_text(html)
        rewritten += count
    return rewritten


def _local(found: re.Match, page: Path, prefix: str) -> str:
    """A remote script, stylesheet or image reference of ``page`` as the path of its vendored copy."""
    asset = next((a for a in ASSETS if a.url == found.group(2).split("?")[0]), None)
    if asset is None:
        raise AssetsUnavailable(f"{page.name} loads {found.group(2)}, which has no vendored copy: add it to "
                                f"pipelines/offline_docs.py ASSETS")
    return f'{found.group(1)}{prefix}/{asset.package}@{asset.version}/{asset.path}"'


def main() -> None:
    """``python -m pipelines.offline_docs``: fetches the assets into the cache (what ``make setup`` runs)."""
    try:
        print(f"web assets for the Data Docs: {fetch_assets()}")
    except AssetsUnavailable as error:
        print(f"offline_docs: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
