"""Sphinx extension: the Colab edition of every chapter, a plain notebook generated from the chapter.

The chapters stay the one source. When the build has finished, each chapter's prose gets this
build's values of its glued numbers (myst-nb keeps them in ``_build/jupyter_execute/chapters/
<chapter>.glue.json``), its MyST markup becomes plain Jupyter markdown, and its exercises'
solutions move to the end, so that a reader on Colab reads the text as the book shows it and
tries an exercise before seeing its answer. Outputs are dropped: the reader's run recomputes them.
The notebooks go to ``_build/editions/colab/<chapter>.ipynb``, and into the site beside the
chapters' pages (``editions/colab/``), where each chapter page links to its own.

The student edition (``_build/editions/student/<chapter>.ipynb``) is the same, except that no
solution remains: each exercise ends with a stub to fill in and a call to its check in
``safetybook.checks``, which names the likely mistake when the answer is not right yet. A solution
cell carries its stub in its metadata (``"student": "<code>"``) and ends with the check call; the
student's cell is the stub followed by the solution's ``checks`` lines. The book itself, with its
solutions in dropdowns, is the instructor's version.

Colab opens notebooks from GitHub: the deploy workflow publishes the editions on the repository's
``editions`` branch, and each chapter page's Colab button is pointed there
(``.../blob/editions/colab/<chapter>.ipynb``). The repository's address stays in one place,
``_config.yml``; the build reads it from the theme's options.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a sibling module; the tests load this file by path
from glued import GLUE, glued_text, read_glue

CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
DOC = re.compile(r"\{doc\}`([^`]+)`")
REF = re.compile(r"\{ref\}`([^`<]+?)(?:\s*<[^`>]+>)?`")  # {ref}`text <label>` or {ref}`label`: the text
TARGET = re.compile(r"^\([\w-]+\)=[ \t]*\n", re.MULTILINE)  # a MyST label line, "(name)="
EXERCISE = re.compile(r"```\{exercise\}[^\n]*\n((?::[\w-]+:[^\n]*\n)*)(.*?)\n```", re.DOTALL)
SOLUTION_START = re.compile(r"```\{solution-start\}\s*(\S*)[^\n]*\n(?::[\w-]+:[^\n]*\n)*```")
SOLUTION_END = re.compile(r"```\{solution-end\}[^\n]*\n(?::[\w-]+:[^\n]*\n)*```")
TOOLS = re.compile(r"tools_table\((\"(\w+)\")?\)")
MARKER = re.compile(f"{SOLUTION_START.pattern}|{SOLUTION_END.pattern}")
ADMONITION = re.compile(r"```\{(note|warning|tip|important)\}[^\n]*\n(.*?)\n```", re.DOTALL)
#: Anything left of MyST's roles and directives (what a plain notebook would show as raw markup).
MARKUP = re.compile(r"\{[a-z][\w:-]*\}`|```\{[\w-]+\}")

CHECK_LINE = re.compile(r"^(from safetybook import checks\b.*|checks\.\w+\(.*)$")
STUDENT_NOTE = ("*This is the student edition of a chapter of* Interpretation for LLM Safety, *generated from "
                "the book's notebook. The numbers in the text are those of the book's build; running the cells "
                "recomputes them. Each exercise ends with a stub: replace its `...` with your code and run the "
                "cell, and its check tells you whether the answer is right, or what to look at. The solutions "
                "are in the book, in the dropdowns under each exercise.*")
YOUR_TURN = "**Your turn.** Replace each `...` with your code, then run the cell: the check below it tests your answer."
NOTE = ("*This is the Colab edition of a chapter of* Interpretation for LLM Safety, *generated from "
        "the book's notebook. The numbers in the text are those of the book's build; running the "
        "cells recomputes them. The solutions to the exercises are at the end.*")


def bibliography(text: str) -> dict[str, tuple[str, str, str]]:
    """``key -> (short authors, year, title)`` from a BibTeX file (the fields the book's entries use)."""
    out = {}
    for key, body in re.findall(r"@\w+\{([^,\s]+),(.*?)\n\}", text, re.DOTALL):
        fields = {k.lower(): v for k, v in re.findall(r"(\w+)\s*=\s*\{(.*?)\},?\s*$", body, re.MULTILINE)}
        names = [n.strip().replace("{", "").replace("}", "") for n in fields.get("author", "").split(" and ")]
        last = [n.split(",")[0].strip() if "," in n else n.split()[-1] if n else "" for n in names]
        short = last[0] if len(last) == 1 else " and ".join(last) if len(last) == 2 else f"{last[0]} et al."
        out[key] = (short, fields.get("year", "n.d."), fields.get("title", "").replace("{", "").replace("}", ""))
    return out


def plain_markdown(text: str, glue: dict, bib: dict, titles: dict[str, str], cited: list[str]) -> str:
    """One markdown cell's text with the glued values, citations and links written out."""
    def glued(m):
        value = glued_text(glue, m.group(1), m.group(2))
        return f"[{m.group(1)}: run the notebook]" if value is None else value

    def cite(m):
        parts = []
        for key in (k.strip() for k in m.group(1).split(",")):
            short, year, _ = bib.get(key, (key, "n.d.", ""))
            cited.append(key) if key not in cited else None
            parts.append(f"[{short}, {year}](#cite-{key})")
        return "(" + "; ".join(parts) + ")"

    def doc(m):
        name = m.group(1).split("/")[-1]
        if name in titles:
            return f"[{titles[name]}]({name}.ipynb)"
        return "the book's references" if name == "references" else name

    text = GLUE.sub(glued, text)
    text = CITE.sub(cite, text)
    text = DOC.sub(doc, text)
    text = REF.sub(lambda m: m.group(1).strip(), TARGET.sub("", text))
    return ADMONITION.sub(lambda m: "\n".join("> " + line for line in
                                              [f"**{m.group(1).capitalize()}.** " + m.group(2).split("\n")[0],
                                               *m.group(2).split("\n")[1:]]), text)


def _cell(kind: str, text: str) -> dict:
    lines = text.split("\n")
    cell = {"cell_type": kind, "metadata": {}, "source": [line + "\n" for line in lines[:-1]] + [lines[-1]]}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def student_cell(cell: dict) -> str | None:
    """A solution cell's student version: its stub, then its check lines (None: the cell has no stub)."""
    stub = cell.get("metadata", {}).get("student")
    if stub is None:
        return None
    lines = "".join(cell["source"]).split("\n")
    checked = [line for line in lines if CHECK_LINE.match(line) and not line.startswith("from ")]
    if not checked:
        raise ValueError(f"a solution cell with a student stub has no check call: {lines[0]!r}")
    return "\n".join(["from safetybook import checks", "", stub.rstrip("\n"), *checked])


def colab_edition(nb: dict, glue: dict, bib: dict, titles: dict[str, str], student: bool = False) -> dict:
    """The plain-notebook edition of one chapter (``nb`` is the chapter's source notebook); with
    ``student``, the student edition: stubs and checks where the solutions were."""
    cells: list[dict] = []
    solutions: list[dict] = []
    cited: list[str] = []
    current: list[dict] | None = None  # the solution being collected, or None
    number = 0

    def add(piece: str) -> None:
        if piece.strip():
            (current if current is not None else cells).append(_cell("markdown", piece.strip()))

    def exercise(m) -> str:
        nonlocal number
        number += 1
        after = "" if student else f"\n\n*[Solution](#solution-{number}) at the end.*"
        return f"#### Exercise {number}\n\n{m.group(2).strip()}{after}"

    for cell in nb["cells"]:
        text = "".join(cell["source"])
        if cell["cell_type"] == "code":
            table = TOOLS.search(text)
            if table:  # a rendered tools table: its MyST output would show raw on Colab, so write it out
                from safetybook.display import tools_table

                add(plain_markdown(tools_table(table.group(2)), glue, bib, titles, cited))
            elif current is None:
                cells.append(_cell("code", text))
            elif not student:
                current.append(_cell("code", text))
            elif (stub := student_cell(cell)) is not None:
                cells += [_cell("markdown", YOUR_TURN), _cell("code", stub)]
            continue
        text = EXERCISE.sub(exercise, plain_markdown(text, glue, bib, titles, cited))
        pos = 0
        for m in MARKER.finditer(text):  # prose outside a solution stays; prose inside moves with it
            add(text[pos : m.start()])
            if SOLUTION_START.fullmatch(m.group(0)):
                current = [_cell("markdown", f'<a id="solution-{number}"></a>\n\n### Solution to exercise {number}')]
            else:
                solutions += [] if student else current or []
                current = None
            pos = m.end()
        add(text[pos:])
    head = next((i for i, c in enumerate(cells) if c["cell_type"] == "markdown"), 0)
    cells.insert(head + 1, _cell("markdown", STUDENT_NOTE if student else NOTE))
    if solutions:
        cells += [_cell("markdown", "## Solutions")] + solutions
    if cited:
        cells.append(_cell("markdown", "## References\n\n" + "\n".join(
            f'- <a id="cite-{k}"></a>{bib[k][0]} ({bib[k][1]}). *{bib[k][2]}*.' for k in cited if k in bib)))
    return {"cells": cells, "metadata": {"kernelspec": nb["metadata"].get("kernelspec", {}),
                                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 4}


def _write(path: Path, nb: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def write_editions(source: Path, executed: Path, out: Path, student: bool = False) -> list[Path]:
    """The Colab (or the student) edition of every chapter under ``source/chapters``, into ``out``."""
    bib = bibliography((source / "references.bib").read_text())
    chapters = sorted((source / "chapters").glob("*.ipynb"))
    titles = {}
    for path in chapters:
        first = next((c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"), None)
        heading = re.match(r"#\s+(.+)", "".join(first["source"])) if first else None
        titles[path.stem] = heading.group(1).strip() if heading else path.stem
    written = []
    for path in chapters:
        glue = read_glue(executed, path.stem)
        _write(out / path.name, colab_edition(json.loads(path.read_text()), glue, bib, titles, student))
        written.append(out / path.name)
    return written


EDITIONS_BRANCH = "editions"
LINK = ('<p class="colab-edition"><a href="../editions/colab/{name}.ipynb" download>Download this chapter\'s '
        'Colab edition</a> (a plain notebook with this build\'s numbers; the Colab button opens the same), or '
        'its <a href="../editions/student/{name}.ipynb" download>student edition</a> (stubs and self-checks '
        'instead of solutions; <a href="https://colab.research.google.com/github/{github}/blob/'
        + EDITIONS_BRANCH + '/student/{name}.ipynb">open it in Colab</a>).</p>')


def point_pages(html_dir: Path, repository: str, branch: str) -> int:
    """Point each chapter page's Colab button at its edition and add a download link; the number of pages."""
    github = repository.rstrip("/").removeprefix("https://github.com/")
    done = 0
    for page in sorted((html_dir / "chapters").glob("*.html")):
        name = page.stem
        if not (html_dir / "editions" / "colab" / f"{name}.ipynb").exists():
            continue
        html = page.read_text()
        source = f"colab.research.google.com/github/{github}/blob/{branch}/chapters/{name}.ipynb"
        edition = f"colab.research.google.com/github/{github}/blob/{EDITIONS_BRANCH}/colab/{name}.ipynb"
        html = html.replace(source, edition)
        if "colab-edition" not in html:
            link = LINK.format(name=name, github=github)
            html = re.sub(r"(<h1[^>]*>.*?</h1>)", lambda m, link=link: m.group(1) + link, html, count=1, flags=re.DOTALL)
        page.write_text(html)
        done += 1
    return done


def _build_finished(app, exception) -> None:
    if exception is not None:
        return
    build = Path(app.outdir).parent
    for kind in ("colab", "student"):
        written = write_editions(Path(app.srcdir), build / "jupyter_execute" / "chapters", build / "editions" / kind,
                                 student=kind == "student")
        site = Path(app.outdir) / "editions" / kind
        site.mkdir(parents=True, exist_ok=True)
        for path in written:
            shutil.copyfile(path, site / path.name)
    options = app.config.html_theme_options or {}
    if options.get("repository_url"):
        point_pages(Path(app.outdir), options["repository_url"], options.get("repository_branch", "main"))


def setup(app):
    app.connect("build-finished", _build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
