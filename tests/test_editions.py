"""The Colab edition: every MyST construct the chapters use becomes plain Jupyter markdown."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("editions", ROOT / "_ext" / "editions.py")
editions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(editions)

BIB = editions.bibliography((ROOT / "references.bib").read_text())
GLUE = {"gain": {"data": {"text/plain": "0.123456"}}, "verdict": {"data": {"text/plain": "'no clear effect'"}}}
TITLES = {"01_training": "Training stage: attribution", "00_start": "Start here"}


def _nb(*cells):
    def cell(kind, text):
        c = {"cell_type": kind, "metadata": {}, "source": text}
        return c | ({"outputs": [{"output_type": "stream", "name": "stdout", "text": "x"}], "execution_count": 1}
                    if kind == "code" else {})
    return {"cells": [cell(k, t) for k, t in cells], "metadata": {"kernelspec": {"name": "python3"}}}


FIXTURE = _nb(
    ("markdown", ("# A chapter\n\nThe survey {cite}`lee2025interpretation,arditi2024refusal` says so; see {doc}`01_training`\n"
                 "and {doc}`../references`, and {ref}`the last section <last-one>`.")),
    ("code", "x = 1"),
    ("markdown", ("The gain is {glue:text}`gain:.2f` ({glue:text}`gain:+.1%`): **{glue:text}`verdict`**.\n\n"
                 "```{note}\n**Cut to run fast.** Fixed samples.\n```")),
    ("code", 'Markdown(tools_table("training"))'),
    ("markdown", ("## Exercises\n\n```{exercise}\n:label: ex-one\n**First** (easy). Do it.\n```\n\n"
                 "```{solution-start} ex-one\n:class: dropdown\n```\nThe idea first.")),
    ("code", "answer = 42"),
    ("markdown", "It works.\n\n```{solution-end}\n```\n\nProse after the solution."),
    ("markdown", "(last-one)=\n## Summary\n\n- {glue:text}`missing_key` stays visible."),
)


def _text(nb):
    return ["".join(c["source"]) for c in nb["cells"]]


def test_the_edition_has_no_myst_markup_and_the_build_values():
    nb = editions.colab_edition(FIXTURE, GLUE, BIB, TITLES)
    texts = _text(nb)
    assert not any(editions.MARKUP.search(t) for t, c in zip(texts, nb["cells"]) if c["cell_type"] == "markdown")
    body = "\n".join(texts)
    assert "The gain is 0.12 (+12.3%): **no clear effect**." in body
    assert "([Lee et al., 2025](#cite-lee2025interpretation); [Arditi et al., 2024](#cite-arditi2024refusal))" in body
    assert "[Training stage: attribution](01_training.ipynb)" in body and "the book's references" in body
    assert "and the last section." in body and "(last-one)=" not in body, "a reference keeps its text, a label goes"
    assert "> **Note.** **Cut to run fast.**" in body
    assert "[missing_key: run the notebook]" in body, "a value the build did not glue must show, not vanish"
    assert all(c.get("outputs") == [] for c in nb["cells"] if c["cell_type"] == "code"), "outputs are dropped"


def test_solutions_move_to_the_end_and_the_prose_around_them_stays():
    nb = editions.colab_edition(FIXTURE, GLUE, BIB, TITLES)
    texts = _text(nb)
    at = texts.index("## Solutions")
    assert "answer = 42" in texts[at:] and "answer = 42" not in texts[:at]
    assert any("The idea first." in t for t in texts[at:]) and any("It works." in t for t in texts[at:])
    assert any("Prose after the solution." in t for t in texts[:at])
    exercise = next(t for t in texts if "#### Exercise 1" in t)
    assert "**First** (easy). Do it." in exercise and "(#solution-1)" in exercise
    assert any('<a id="solution-1"></a>' in t for t in texts[at:])


def test_a_tools_table_is_written_out_and_citations_are_listed():
    nb = editions.colab_edition(FIXTURE, GLUE, BIB, TITLES)
    texts = _text(nb)
    assert not any("tools_table(" in t for t in texts)
    table = next(t for t in texts if t.startswith("| Tool |"))
    assert "Kronfluence ([Grosse et al., 2023](#cite-grosse2023influence))" in table
    refs = texts[-1]
    assert refs.startswith("## References") and '<a id="cite-grosse2023influence"></a>' in refs


def test_every_chapter_gets_an_edition(tmp_path):
    glue_dir = tmp_path / "glue"
    glue_dir.mkdir()
    written = editions.write_editions(ROOT, glue_dir, tmp_path / "colab")
    assert [p.name for p in written] == sorted(p.name for p in (ROOT / "chapters").glob("*.ipynb"))
    for path in written:
        nb = json.loads(path.read_text())
        assert nb["cells"] and not any(editions.MARKUP.search("".join(c["source"])) for c in nb["cells"]
                                       if c["cell_type"] == "markdown"), path.name


def test_chapter_pages_open_their_colab_edition_and_link_to_it(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "editions" / "colab").mkdir(parents=True)
    (tmp_path / "editions" / "colab" / "02_input.ipynb").write_text("{}")
    button = "https://colab.research.google.com/github/org/book/blob/main/chapters/02_input.ipynb"
    (tmp_path / "chapters" / "02_input.html").write_text(f'<h1>Input<a href="#">#</a></h1><a href="{button}">Colab</a>')
    (tmp_path / "chapters" / "03a_probe.html").write_text(f'<h1>Probe</h1><a href="{button}">Colab</a>')
    assert editions.point_pages(tmp_path, "https://github.com/org/book", "main") == 1
    page = (tmp_path / "chapters" / "02_input.html").read_text()
    assert "github/org/book/blob/editions/colab/02_input.ipynb" in page and button not in page
    assert page.index("</h1>") < page.index('href="../editions/colab/02_input.ipynb"')
    assert button in (tmp_path / "chapters" / "03a_probe.html").read_text(), "no edition: the page is left alone"


STUDENT_FIXTURE = _nb(
    ("markdown", "# A chapter\n\nSome prose."),
    ("markdown", ("## Exercises\n\n```{exercise}\n:label: ex-one\n**First** (easy). Do it.\n```\n\n"
                 "```{solution-start} ex-one\n:class: dropdown\n```\nThe idea first.")),
    ("code", "from safetybook import checks\n\nanswer = sorted(scores)[:3]  # the solution\nchecks.lens_share(answer, rank)\nanswer"),
    ("code", "print('more of the solution')"),
    ("markdown", "It works.\n\n```{solution-end}\n```\n\nProse after the solution."),
)
STUDENT_FIXTURE["cells"][2]["metadata"]["student"] = "answer = ...  # the three smallest scores"


def test_the_student_edition_keeps_no_solution_only_its_stub_and_check():
    nb = editions.colab_edition(STUDENT_FIXTURE, GLUE, BIB, TITLES, student=True)
    body = "\n".join(_text(nb))
    for solution in ("sorted(scores)", "more of the solution", "The idea first.", "It works.", "## Solutions"):
        assert solution not in body, f"the student edition shows {solution!r}"
    code = [t for t, c in zip(_text(nb), nb["cells"]) if c["cell_type"] == "code"]
    assert code == ["from safetybook import checks\n\nanswer = ...  # the three smallest scores\nchecks.lens_share(answer, rank)"]
    assert "Prose after the solution." in body and "#### Exercise 1" in body and "(#solution-1)" not in body
    assert "student edition" in body


def test_a_stub_without_a_check_call_is_refused():
    broken = json.loads(json.dumps(STUDENT_FIXTURE))
    broken["cells"][2]["source"] = "answer = 1"
    with pytest.raises(ValueError, match="no check call"):
        editions.colab_edition(broken, GLUE, BIB, TITLES, student=True)


def test_every_exercise_of_the_book_has_a_stub_and_a_real_check():
    """Each chapter's exercises (by label) each end in exactly one stubbed cell whose check is the
    exercise's own in ``safetybook.checks.EXERCISES``; the student edition holds no solution line."""
    from safetybook import checks

    labels = []
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        found = {}
        label = None
        outside = []  # code the chapter shows outside its solutions: the student edition keeps it
        solution_code = []
        for cell in nb["cells"]:
            text = "".join(cell["source"])
            if cell["cell_type"] == "markdown":
                starts = editions.SOLUTION_START.findall(text)
                label = starts[-1] if starts else None if editions.SOLUTION_END.search(text) else label
            elif not label:
                outside.append(text)
            elif solution_code.append(text) or "student" in cell["metadata"]:
                calls = [m for m in (editions.CHECK_LINE.match(line) for line in text.split("\n"))
                         if m and m.group(0).startswith("checks.")]
                assert len(calls) == 1, f"{path.name} {label}: one check call per exercise"
                name = calls[0].group(0).split("(")[0].removeprefix("checks.")
                assert checks.EXERCISES[label].__name__ == name, f"{path.name} {label}: calls checks.{name}"
                found[label] = text
        exercises = re.findall(r":label: (ex-[\w-]+)", "".join("".join(c["source"]) for c in nb["cells"]))
        assert sorted(found) == sorted(exercises), f"{path.name}: exercises without a stub: {set(exercises) - set(found)}"
        labels += exercises
        student = "\n".join("".join(c["source"]) for c in editions.colab_edition(nb, {}, BIB, {}, student=True)["cells"])
        for text in solution_code:
            for line in text.split("\n"):
                if (len(line.strip()) > 25 and not editions.CHECK_LINE.match(line) and line not in student_stubs(nb)
                        and not any(line in o for o in outside)):
                    assert line not in student, f"{path.name}: a solution line is in the student edition: {line!r}"
    assert sorted(labels) == sorted(checks.EXERCISES), "every check belongs to an exercise of the book"


def student_stubs(nb) -> str:
    return "\n".join(c["metadata"]["student"] for c in nb["cells"] if "student" in c.get("metadata", {}))
