"""Point the install instructions at a repository: one URL, written everywhere it is used.

    python scripts/set_repository.py https://github.com/OWNER/circuitlab

Sets ``[project.urls] Repository`` in ``pyproject.toml`` (the one place the URL is
stated) and rewrites from it every notebook's Colab badge and setup cell and the README's
install line. With no argument it re-applies the URL already in ``pyproject.toml``. A fork
runs it once with its own URL and commits the result.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def repository() -> str:
    """The repository URL stated in ``pyproject.toml``."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def colab_badge_target(url: str, notebook: str) -> str:
    """The Colab address that opens ``notebook`` of the GitHub repository ``url``."""
    owner_repo = re.sub(r"^https://github\.com/", "", url.rstrip("/"))
    return f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{notebook}"


def apply(url: str) -> None:
    if not re.match(r"^https://github\.com/[\w.-]+/[\w.-]+/?$", url):
        raise SystemExit(f"{url!r} is not a GitHub repository URL (https://github.com/OWNER/NAME); "
                         "Colab opens notebooks from GitHub.")
    url = url.rstrip("/")
    pyproject = ROOT / "pyproject.toml"
    text = pyproject.read_text()
    text = re.sub(r'(?m)^Repository = ".*"$', f'Repository = "{url}"', text)
    pyproject.write_text(text)
    for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        for cell in nb["cells"]:
            source = "".join(cell["source"])
            source = re.sub(r"https://colab\.research\.google\.com/github/[^)\s\"]+",
                            colab_badge_target(url, nb_path.name), source)
            source = re.sub(r"circuitlab @ git\+[^\"\s]+", f"circuitlab @ git+{url}", source)
            lines = source.split("\n")
            cell["source"] = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
        nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    readme = ROOT / "README.md"
    readme.write_text(re.sub(r"circuitlab @ git\+[^\"\s]+", f"circuitlab @ git+{url}",
                             readme.read_text()))


if __name__ == "__main__":
    apply(sys.argv[1] if len(sys.argv) > 1 else repository())
