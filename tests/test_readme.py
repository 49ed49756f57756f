"""The README and docs stay true: every flag of every job is documented, and the quick start is the Makefile's."""

import re
import subprocess

import pytest

from conftest import PYTHON, REPO

README = (REPO / "README.md").read_text()
JOB_DOCS = {"train.py": REPO / "docs" / "training.md", "generate.py": REPO / "docs" / "generation.md",
            "score.py": REPO / "docs" / "scoring.md"}


@pytest.mark.parametrize("script", sorted(JOB_DOCS))
def test_every_job_flag_is_in_its_doc(script):
    help_text = subprocess.run([PYTHON, f"jobs/{script}", "--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", help_text)) - {"--help"}
    assert len(flags) > 10
    doc = JOB_DOCS[script].read_text()
    missing = sorted(f for f in flags if f"`{f}" not in doc)
    assert not missing, f"{JOB_DOCS[script].name} does not document {missing}"


def test_quick_start_is_two_make_targets_that_exist():
    quick = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["make train", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^train:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_no_unfilled_placeholders():
    assert "{{" not in README, re.findall(r"\{\{[A-Z_]+\}\}", README)


def test_the_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 200
    for doc in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", README):
        assert (REPO / doc).exists(), doc
