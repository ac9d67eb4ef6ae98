"""Print the torch/torchvision pair this project installs, as pip requirements.

The first pair whose two wheels lie on this disk, where pip looks for them (its
``find-links`` folders and ``file://`` index URLs, as ``pip config list`` shows them), is
taken; with neither on disk, the first pair, which pip then downloads::

    $ python scripts/pick_torch.py
    torch==2.14.1 torchvision==0.29.1
"""

import html.parser
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request

PAIRS = [("2.14.1", "0.29.1"), ("2.13.0+cpu", "0.28.0+cpu")]


def pip_locations():
    """Local folders of wheels (find-links) and local simple indexes (file:// URLs)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    folders, indexes = [], []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        for item in value.strip().strip("'\"").split():
            local = item
            if item.startswith("file:"):
                local = urllib.request.url2pathname(urllib.parse.urlparse(item).path)
            if option == "find-links" and os.path.isdir(local):
                folders.append(local)
            elif option in ("index-url", "extra-index-url") and os.path.isdir(local):
                indexes.append(local)
    return folders, indexes


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [value for name, value in attrs if name == "href" and value]


def wheel_files(name, folders, indexes):
    """Paths of the wheels of project `name` found in the folders and indexes."""
    found = [os.path.join(folder, f) for folder in folders for f in sorted(os.listdir(folder))]
    for index in indexes:
        page_dir = os.path.join(index, re.sub(r"[-_.]+", "-", name).lower())
        page = os.path.join(page_dir, "index.html")
        if not os.path.isfile(page):
            continue
        parser = _Links()
        with open(page, encoding="utf-8") as f:
            parser.feed(f.read())
        for href in parser.hrefs:
            path = urllib.parse.unquote(urllib.parse.urlparse(href).path)
            found.append(os.path.normpath(os.path.join(page_dir, path)))
    return [p for p in found if p.endswith(".whl") and os.path.isfile(p)]


def installable(wheel, name, version):
    """Whether `wheel` is `name`==`version` for this interpreter and platform."""
    try:
        from pip._vendor.packaging.tags import sys_tags
        from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
        from pip._vendor.packaging.version import Version
    except ImportError:  # a pip without its vendored packaging: compare the name only
        return os.path.basename(wheel).startswith(f"{name}-{version}-")
    try:
        wname, wversion, _, wtags = parse_wheel_filename(os.path.basename(wheel))
    except Exception:
        return False
    if canonicalize_name(wname) != canonicalize_name(name) or wversion != Version(version):
        return False
    return not wtags.isdisjoint(set(sys_tags()))


def on_disk(name, version, folders, indexes):
    return any(installable(w, name, version) for w in wheel_files(name, folders, indexes))


def main():
    folders, indexes = pip_locations()
    for torch_version, vision_version in PAIRS:
        if on_disk("torch", torch_version, folders, indexes) and on_disk(
            "torchvision", vision_version, folders, indexes
        ):
            break
    else:
        torch_version, vision_version = PAIRS[0]
    print(f"torch=={torch_version} torchvision=={vision_version}")


if __name__ == "__main__":
    main()
