"""The user guide: it builds in strict mode, every bonedist flag it mentions exists, and every shell block is run on
phantoms or says what it needs (a cluster, a GPU, hours of compute, the network)."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, run_train

PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- docs-test: (run|needs .+?) -->")
SHELL = ("bash", "sh", "shell", "console", "")
# flags of other programs that the docs mention beside bonedist's (accelerate, sbatch, pytest, wandb, make)
FOREIGN = {"--config_file", "--num_processes", "--multi_gpu", "--mixed_precision", "--main_process_port",
           "--num_machines", "--machine_rank", "--main_process_ip", "--signal", "--requeue", "--nodes",
           "--gpus-per-node", "--time", "--parsable", "--chdir", "--output", "--dependency", "--ntasks-per-node",
           "--cpus-per-task", "--partition", "--mem", "--array", "--exclusive"}


def shell_blocks(page: Path) -> list[tuple[int, str | None, str]]:
    """(line, marker or None, body) of every shell code block of ``page``."""
    lines = page.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, end = lines[i][3:].strip(), i + 1
            while not lines[end].startswith("```"):
                end += 1
            if lang in SHELL:
                found = MARKER.search(lines[i - 1]) if i else None
                blocks.append((i + 1, found.group(1) if found else None, "\n".join(lines[i + 1:end])))
            i = end + 1
        else:
            i += 1
    return blocks


def commands(text: str) -> list[list[str]]:
    """The argument lists of every bonedist invocation in shell text (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.split("\n"):
        line = line.split(" #", 1)[0].strip()
        if line.startswith("#"):
            continue
        for part in re.split(r"&&|\|\||;|\|", line):
            words = part.split()
            if "bonedist" in words:
                out.append(words[words.index("bonedist") + 1:])
            elif "bonedist.train" in words:
                out.append(["train", *words[words.index("bonedist.train") + 1:]])
    return out


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every bonedist command's parser by its words (``train``, ``bench accuracy``, ``weights fetch``)."""
    from bonedist.cli import build_parser

    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        found[" ".join(words)] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*words, name))

    walk(build_parser(), ())
    return found


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_every_shell_block_is_run_or_says_what_it_needs():
    unmarked = [f"{page.relative_to(REPO)}:{line}" for page in PAGES for line, marker, body in shell_blocks(page)
                if marker is None and body.strip()]
    assert not unmarked, f"shell blocks without a <!-- docs-test: run | needs ... --> line above: {unmarked}"


def test_every_bonedist_command_and_flag_in_the_docs_exists():
    parsers = _parsers()
    every_flag = set().union(*(_flags(p) for p in parsers.values()))
    problems, checked = [], 0
    for page in PAGES:
        text = page.read_text()
        spans = [m.group(1) for m in re.finditer(r"`(bonedist [^`]+)`", text)]
        invocations = [c for _, _, body in shell_blocks(page) for c in commands(body)]
        invocations += [c for span in spans for c in commands(span)]
        for words in invocations:
            names = [w for w in words if not w.startswith("-")]
            command = next((" ".join(names[:n]) for n in (2, 1) if " ".join(names[:n]) in parsers), None)
            if command is None:
                if names and not names[0].isupper() and "|" not in names[0]:
                    problems.append(f"{page.name}: no command 'bonedist {' '.join(names[:2])}'")
                continue
            flags = _flags(parsers[command])
            for word in words:
                flag = word.split("=", 1)[0].rstrip(",.;)")
                if flag.startswith("--") and re.fullmatch(r"--[a-z][a-z0-9-]*", flag):
                    checked += 1
                    if flag not in flags:
                        problems.append(f"{page.name}: bonedist {command} has no {flag}")
        for flag in re.findall(r"`(--[a-z][a-z0-9-]*)[ `=]", text):  # flags named alone in the prose
            checked += 1
            if flag not in every_flag and flag not in FOREIGN:
                problems.append(f"{page.name}: no bonedist command has {flag}")
    assert checked > 100 and not problems, problems


@pytest.mark.slow
def test_the_docs_build_in_strict_mode(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    assert mkdocs.exists(), "mkdocs is not installed in this environment (pip install -e '.[dev]')"
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                                                                               "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "troubleshooting" / "index.html").is_file()


@pytest.fixture(scope="module")
def sandbox(phantom_root, train_shards, tmp_path_factory) -> Path:
    """A folder laid out as the docs' commands expect: data/rsna (phantoms in the official layouts), a training-only
    download, images, a DICOM, a worklist, an archive export, and runs/rsna trained briefly (standing in for the
    training blocks that need hours)."""
    import cv2

    from tests.test_clinical import write_dicom

    box = tmp_path_factory.mktemp("docs-sandbox")
    shutil.copytree(phantom_root, box / "data" / "rsna")
    kaggle = box / "data" / "kaggle-train"
    kaggle.mkdir()
    shutil.copy(phantom_root / "boneage-training-dataset.csv", kaggle)
    shutil.copytree(phantom_root / "boneage-training-dataset", kaggle / "boneage-training-dataset")
    image = sorted((phantom_root / "boneage-training-dataset").rglob("*.png"))[0]
    for target in (box / "hand.png", box / "data" / "rsna" / "hand.png"):
        shutil.copy(image, target)
    (box / "archive" / "export").mkdir(parents=True)
    shutil.copy(image, box / "archive" / "export" / "a.png")
    gray = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)
    for target in (box / "study.dcm", box / "archive" / "export" / "b.dcm"):
        write_dicom(target, gray.astype("uint16") * 16, bits=12, sex="M", age="010Y")
    (box / "worklist.csv").write_text("image,sex,chronological_age\ndata/rsna/hand.png,F,10y3m\nhand.png,M,123\n")
    from bonedist.data.pack import PackOptions, pack_dataset

    _, code = pack_dataset(box / "data" / "rsna", box / "shards" / "rsna", PackOptions(size=64, workers=1,
                                                                                     progress=False))
    assert code == 0
    for model in ("xception", "agcnn"):
        result = run_train("--model", model, "--shards", str(train_shards), "--preset", "tiny", "--epochs", "1",
                           "--steps-per-epoch", "3", "--experiment", "rsna", runs=box / "runs")
        assert result.returncode == 0, result.stderr[-2000:]
    assert run_cli("evaluate", "--runs", str(box / "runs" / "rsna"), "--wandb", "off").returncode == 0
    return box


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(m == "run" for _, m, _ in shell_blocks(p))],
                         ids=lambda p: p.name)
def test_the_docs_run_blocks_run_on_phantoms(sandbox, tmp_path, page):
    box = tmp_path / "box"
    shutil.copytree(sandbox, box, symlinks=True)
    bin_dir = Path(sys.executable).parent
    for line, marker, body in shell_blocks(page):
        if marker != "run":
            continue
        script = f"set -euo pipefail\nexport PATH={bin_dir}:$PATH WANDB_MODE=disabled\n{body}\n"
        result = subprocess.run(["bash", "-c", script], cwd=box, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{page.name}:{line} failed:\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, result.stderr[-3000:]


# a number with the unit of a result (a range such as "0-228 months" states a bound, not a result)
MEASURED = re.compile(r"(?<![-–\d])\b\d+(\.\d+)?\s*(months|img/s|images/s|radiographs/s|ms|seconds|minutes|GFLOP)\b|"
                      r"\b\d+\.\d+x\b|\bMAE \d")
# what the synthetic phantoms are made of: parameters of a generator, not results
DESIGN = {"bonedist/data/synth.py"}


def test_no_docstring_or_comment_quotes_a_measured_figure():
    """Measurements live in docs/results.md with their date and command; code says what a thing is and why."""
    import ast
    import io
    import tokenize

    found = []
    for path in sorted((REPO / "bonedist").rglob("*.py")):
        if path.relative_to(REPO).as_posix() in DESIGN:
            continue
        source = path.read_text()
        texts = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
                 if t.type == tokenize.COMMENT]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    texts.append((getattr(node, "lineno", 1), doc))
        for line, text in texts:
            for match in MEASURED.finditer(text):
                found.append(f"{path.relative_to(REPO)}:{line}: ...{text[max(0, match.start() - 40):match.end()]}")
    assert not found, "\n".join(found)
