"""Sphinx extension: emit each script tag once (sphinx-book-theme adds two inline scripts twice,
which makes every page throw "Identifier 'THEBE_JS_URL' has already been declared")."""


def _dedupe(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for script in context.get("script_files", []):
        attributes = getattr(script, "attributes", {})
        key = (getattr(script, "filename", None) or "", str(attributes.get("body", "")),
               tuple(sorted((k, str(v)) for k, v in attributes.items() if k not in ("priority", "body"))))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _dedupe, priority=1000)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
