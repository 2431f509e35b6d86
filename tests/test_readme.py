"""README's two commands and CI stay in sync."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
            if line.startswith("python3 -m venv")]


def test_readme_has_exactly_the_two_setup_commands():
    commands = readme_commands()
    assert len(commands) == 2
    demo, tests = commands
    for cmd in commands:
        assert "pip install torch==2.13.0 -e " in cmd  # CPU torch in the same pip command
        assert "uv " not in cmd and "poetry" not in cmd
    assert "diffusion-shortcuts demo" in demo
    assert "'.[test]'" in tests and "HF_HUB_OFFLINE=1" in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    pattern = re.search(r'grep -m1 -E "(.*?)" README.md', ci).group(1)
    matches = [c for c in readme_commands() if re.search(pattern, c)]
    assert matches == [readme_commands()[1]]


def test_the_docs_stand_alone():
    """Users who clone the repository have no ../shared folder: nothing may point there."""
    for doc in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *ROOT.glob("src/**/*.md")]:
        assert "../shared" not in doc.read_text(), doc
