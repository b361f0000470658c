"""The README and docs/ link to each other by file and anchor: every relative link must resolve."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    found = set(re.findall(r'<a id="([^"]+)"', text))
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"#+ (.*)", line)):
            found.add(_slug(match.group(1)))
    return found


def test_every_relative_link_of_the_readme_and_docs_resolves():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    anchors = {f: _anchors(f.read_text()) for f in files}
    broken, checked = [], 0
    for source in files:
        for link in re.findall(r"\]\(([^)\s]+)\)", source.read_text()):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (source.parent / path).resolve() if path else source
            checked += 1
            if not target.exists():
                broken.append(f"{source.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in anchors.get(target, _anchors(target.read_text())):
                broken.append(f"{source.name}: {link} (no such heading or anchor)")
    assert checked > 50  # the README's links into docs/ and theirs back
    assert not broken, broken


def test_anchors_follow_githubs_heading_rule():
    assert _slug("Real-size models: SD 1.5 and SDXL UNet layouts") == "real-size-models-sd-15-and-sdxl-unet-layouts"
    assert _anchors("# A b\n```\n# not a heading\n```\n<a id=\"x\"></a>**X**") == {"a-b", "x"}
