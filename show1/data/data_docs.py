"""Great Expectations Data Docs that work offline: no page of the site loads anything from the network.

GX's pages load Bootstrap, jQuery, Font Awesome, bootstrap-table, a date picker and Vega from CDNs, and its index
page fills its tables with bootstrap-table's JavaScript: offline, every page is unstyled and the index lists nothing.
Here:

- `StaticIndexPageView` renders the index's tables as plain HTML when the site is built, so the index lists every
  suite and validation result without any script (bootstrap-table, its filters and date picker are not needed);
- `make_offline` copies jQuery, Bootstrap 4 and Font Awesome from their XStatic wheels into the site's
  `static/vendor/`, points the pages' tags at those copies, and removes every other remote script, stylesheet,
  image and CSS `url()`: bootstrap-table, the date picker and Vega (no page of ours draws a chart), the dark theme
  (the pages stay light) and GX's logo on S3 (the site has its own copy under `static/images/`). It also points
  each page's relative `static/` paths at the site root: GX counts one folder short for a validation page's favicon.

Imported by GX itself (the index builder's `view`) and by `contracts._run_suites`, both after
`apply_environment_defaults`, so importing great_expectations here is fine.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from great_expectations.render.view import DefaultJinjaIndexPageView
from jinja2 import ChoiceLoader, DictLoader

VENDOR = "static/vendor"
IMAGES = "static/images"

# GX's index tables as HTML: the same columns and cells bootstrap-table would draw. A row's cells that hold no link
# of their own link to the row's page (bootstrap-table made the whole row clickable).
STATIC_TABLE = """\
{% include 'content_block_header.j2' %}
{% set body = content_block.get("styling", {}).get("body", {}) -%}
{% set body = dict(body, classes=["table", "table-hover"] + body.get("classes", [])) -%}
{% set columns = content_block["table_columns"] %}
<table id="{{ content_block_id }}-body-table" {{ body | render_styling
  | replace("{{section_id}}", section_id) | replace("{{content_block_id}}", content_block_id) }}>
  <thead>
    {% if "title_row" in content_block %}
    <tr><th colspan="{{ columns | length }}">{{ content_block["title_row"] | render_content_block }}</th></tr>
    {% endif %}
    <tr>{% for column in columns %}<th>{{ column["title"] }}</th>{% endfor %}</tr>
  </thead>
  <tbody>
  {% for row in content_block["table_data"] | render_bootstrap_table_data %}
    {% set link = row.get("_table_row_link_path") %}
    <tr>
    {% for column in columns %}
      {% set cell = row.get(column["field"], "") | string %}
      <td>{% if link and "<a " not in cell %}<a href="{{ link }}">{{ cell }}</a>{% else %}{{ cell }}{% endif %}</td>
    {% endfor %}
    </tr>
  {% endfor %}
  </tbody>
</table>
"""


class StaticIndexPageView(DefaultJinjaIndexPageView):
    """GX's index page, with its bootstrap-table tables rendered to HTML at build time (`STATIC_TABLE`)."""

    def __init__(self, custom_styles_directory: str | None = None, custom_views_directory: str | None = None):
        super().__init__(custom_styles_directory, custom_views_directory)
        self.env.loader = ChoiceLoader([DictLoader({"bootstrap_table.j2": STATIC_TABLE}), self.env.loader])


def _xstatic_files() -> dict[str, Path]:
    """Each file the site gets under `static/vendor/`, from the XStatic wheel that ships it."""
    from xstatic.pkg import bootstrap, font_awesome, jquery

    files = {"jquery/jquery.min.js": Path(jquery.BASE_DIR) / "jquery.min.js"}
    bootstrap_dir = Path(bootstrap.BASE_DIR)
    files["bootstrap/css/bootstrap.min.css"] = bootstrap_dir / "css" / "bootstrap.min.css"
    files["bootstrap/js/bootstrap.bundle.min.js"] = bootstrap_dir / "js" / "bootstrap.bundle.min.js"  # with Popper
    fa_dir = Path(font_awesome.BASE_DIR)
    files["font-awesome/css/all.min.css"] = fa_dir / "css" / "all.min.css"
    files["font-awesome/LICENSE.txt"] = fa_dir / "LICENSE.txt"
    for font in sorted((fa_dir / "webfonts").iterdir()):  # all.min.css loads them from ../webfonts/
        files[f"font-awesome/webfonts/{font.name}"] = font
    return files


# The CDN files GX's templates load that have a local copy (matched on the URL's path), and that copy. Popper has
# none of its own: Bootstrap's bundle includes it.
LOCAL_COPIES = (
    (re.compile(r"/jquery-3\.[\d.]+(\.min)?\.js$"), "jquery/jquery.min.js"),
    (re.compile(r"/bootstrap/4\.[\d.]+/css/bootstrap(\.min)?\.css$"), "bootstrap/css/bootstrap.min.css"),
    (re.compile(r"/bootstrap/4\.[\d.]+/js/bootstrap(\.min)?\.js$"), "bootstrap/js/bootstrap.bundle.min.js"),
    (re.compile(r"/font-awesome/6\.[\d.]+/css/all(\.min)?\.css$"), "font-awesome/css/all.min.css"),
)
REMOTE = r"(?:https?:)?//"
# A tag that loads a remote resource: <script src=…></script>, <link href=…> (stylesheets, icons), <img src=…>.
REMOTE_TAG = re.compile(
    rf"<(?P<tag>script|link|img)\b[^>]*?\b(?:src|href)\s*=\s*(?P<q>[\"'])(?P<url>{REMOTE}[^\"']*)(?P=q)[^>]*>"
    r"(?P<close>\s*</script>)?", re.IGNORECASE)
REMOTE_CSS_URL = re.compile(rf"url\(\s*(?P<q>[\"']?)(?P<url>{REMOTE}[^)\"']*)(?P=q)\s*\)", re.IGNORECASE)
# A tag that loads one of the site's static files by a relative path (re-rooted: see the module docstring).
STATIC_TAG = re.compile(
    r"<(?:script|link|img)\b[^>]*?\b(?:src|href)\s*=\s*[\"'](?P<url>(?:\.{1,2}/)*static/[^\"']*)[\"']", re.IGNORECASE)
CHECK_ATTRIBUTES = re.compile(r"\s(?:integrity|crossorigin)(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s>]+))?", re.IGNORECASE)


def make_offline(site_dir: Path) -> None:
    """Copy the vendored files into `site_dir/static/vendor/` and make every page and stylesheet of the site
    refer to local files only (see the module docstring)."""
    vendor = site_dir / VENDOR
    for name, source in _xstatic_files().items():
        (vendor / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, vendor / name)
    for path in sorted([*site_dir.rglob("*.html"), *site_dir.rglob("*.css")]):
        if vendor in path.parents:
            continue
        text = path.read_text(encoding="utf-8")
        offline = localise(text, "../" * len(path.parent.relative_to(site_dir).parts), site_dir)
        if offline != text:
            path.write_text(offline, encoding="utf-8")


def localise(text: str, to_root: str, site_dir: Path) -> str:
    """`text` (HTML or CSS) with its remote resources pointed at the site's local copies (`to_root`: the way from
    the file's folder up to `site_dir`, e.g. `../../`) and those without one removed."""

    def local(url: str) -> str | None:
        path = urlparse(url if not url.startswith("//") else f"https:{url}").path
        for pattern, name in LOCAL_COPIES:
            if pattern.search(path):
                return f"{to_root}{VENDOR}/{name}"
        image = PurePosixPath(path).name  # GX's own images (its logo) are in the site's static/images too
        if image and (site_dir / IMAGES / image).is_file():
            return f"{to_root}{IMAGES}/{image}"
        return None

    def tag(match: re.Match[str]) -> str:
        close = match["close"] or ""  # a script's end tag (after a link or an image: someone else's, kept)
        opening = match[0][:len(match[0]) - len(close)]
        replacement = local(match["url"])
        if replacement is None:
            return "" if match["tag"].lower() == "script" else close
        opening = CHECK_ATTRIBUTES.sub("", opening)  # the CDN file's hash does not cover the local copy
        return opening.replace(match["url"], replacement, 1) + close

    def css_url(match: re.Match[str]) -> str:
        replacement = local(match["url"])
        return "none" if replacement is None else f"url('{replacement}')"

    def rerooted(match: re.Match[str]) -> str:
        url = match["url"]
        return match[0].replace(url, to_root + url[url.index("static/"):], 1)

    return STATIC_TAG.sub(rerooted, REMOTE_CSS_URL.sub(css_url, REMOTE_TAG.sub(tag, text)))
