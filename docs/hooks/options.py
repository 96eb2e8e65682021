"""MkDocs hook: the option tables of the docs, generated from the declarations in
edge_genarm/config.py (and SamplingSettings), never written beside them.

A page writes `<!-- options: load -->`, `<!-- options: request -->` or
`<!-- options: sampling -->` where a table goes."""

import re


def on_page_markdown(markdown: str, **_) -> str:
    if "<!-- options:" not in markdown:
        return markdown
    from edge_genarm.config import LoadConfig, RequestParams
    from edge_genarm.options import option_table
    from edge_genarm.sampling import SamplingSettings

    classes = {"load": LoadConfig, "request": RequestParams, "sampling": SamplingSettings}
    return re.sub(r"<!-- options: (\w+) -->", lambda m: option_table(classes[m.group(1)]),
                  markdown)
