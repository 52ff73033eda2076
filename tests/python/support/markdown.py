"""Reading the repository's Markdown as a reader follows it: the relative links of a page (code
blocks left out), and the ones that lead nowhere."""

import re
from collections.abc import Iterable
from pathlib import Path


def markdown_links(path: Path) -> list[str]:
    """The relative link targets of a page (with their #anchors), outside code blocks."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


def broken_links(pages: Iterable[Path], root: Path) -> list[str]:
    """'page: target' for each relative link of the pages whose file does not exist."""
    broken = []
    for page in pages:
        for target in markdown_links(page):
            path = target.split("#")[0]
            if path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(root)}: {target}")
    return broken
