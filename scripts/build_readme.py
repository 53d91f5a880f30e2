"""Write README.md from nbs/index.ipynb (markdown cells verbatim, code cells as Python blocks; `#| hide` cells skipped;
image links relative to nbs/, such as `images/x.png`, rewritten to start at the repository root).

    python scripts/build_readme.py          # write README.md
    python scripts/build_readme.py --check  # exit 1 if README.md is out of date

`nbdev-readme` does the same through Quarto; this keeps the README reproducible on machines without Quarto.
"""
import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]


def render(notebook: Path) -> str:
    blocks = []
    for cell in json.loads(notebook.read_text())["cells"]:
        source = "".join(cell["source"]).strip()
        if not source or source.startswith("#| hide"): continue
        if cell["cell_type"] == "markdown": blocks.append(source.replace("](images/", "](nbs/images/"))
        elif cell["cell_type"] == "code":
            lines = [line for line in source.splitlines() if not line.startswith("#|")]
            blocks.append("```python\n" + "\n".join(lines).strip() + "\n```")
    header = "<!-- Generated from nbs/index.ipynb by scripts/build_readme.py: edit the notebook, not this file. -->"
    return header + "\n\n" + "\n\n".join(blocks) + "\n"


if __name__ == "__main__":
    text, readme = render(root / "nbs/index.ipynb"), root / "README.md"
    if "--check" in sys.argv[1:]:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md is out of date with nbs/index.ipynb: run python scripts/build_readme.py")
    else:
        readme.write_text(text)
