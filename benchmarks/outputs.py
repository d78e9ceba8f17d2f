"""Where every benchmark's results go: raw JSON and the Markdown table made from it, side by side."""
import json
from pathlib import Path


def write_outputs(out: Path, name: str, data: dict, markdown: str) -> None:
    """`out/<name>.json` (the run's meta and every row) and `out/<name>.md`; the table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
