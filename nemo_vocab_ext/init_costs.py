"""What each init costs, as measured: read from the result file packaged with this module.

``measured/quality.json`` holds the init-quality experiment's numbers (``tools/quality.py
--publish`` writes it) and what they were measured on; the resize report quotes them with that
label, and the README's "Which init: measured" table is these rows.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from .core.rows import Init

RESULT_FILE = "measured/quality.json"
BASELINE = Init.ZEROS  # what the Thai column compares every other init against


@lru_cache(maxsize=1)
def measured() -> dict[str, Any]:
    """The packaged result file, parsed (read once)."""
    return json.loads(resources.files(__package__).joinpath(RESULT_FILE).read_text(encoding="utf-8"))


def measured_on(result: dict[str, Any]) -> str:
    """What the numbers were measured on, in a few words."""
    model, base, new, seeds = result["model"], result["base"], result["new"], len(result["seeds"])
    return (
        f"a {model['num_layers']}-layer GPT (hidden {model['hidden_size']}) with a {base['vocab_size']}-token "
        f"{base['language']} {base['tokenizer']} + {new['new_tokens']} {new['language']} tokens, "
        f"{seeds} seed{'s' if seeds != 1 else ''}"
    )


def expected_cost(init: Init, result: dict[str, Any] | None = None) -> str:
    """The resize report's line on ``init``: its measured costs and where it stands on the new language."""
    result = result or measured()
    inits: dict[str, dict[str, Any]] = result["inits"]
    label = f"measured on {measured_on(result)}"
    if str(init) not in inits:
        return f"not measured yet ({', '.join(inits)} were, {label})"
    row = inits[str(init)]
    best = min(inits, key=lambda name: inits[name]["th_final"])
    if str(init) == best:
        baseline = inits.get(str(BASELINE))
        ahead = (
            ""
            if baseline is None or best == BASELINE
            else f" ({baseline['th_final'] - row['th_final']:.2f} nats ahead of {BASELINE})"
        )
        new_language = f"the best on the new one{ahead}"
    else:
        new_language = f"{row['th_final'] - inits[best]['th_final']:.2f} nats behind {best} on the new one"
    return (
        f"{label}: {row['en_step0_cost']:+.2f} nats of base-language loss at step 0 "
        f"({row['p_new_en_step0']:.0%} of probability on new ids); after {result['continual_steps']} mixed steps "
        f"{row['en_final_cost']:+.2f} on the base language and {new_language}"
    )


def readme_rows(result: dict[str, Any]) -> list[str]:
    """The README's table rows: the lowest value of each column in bold, and the name of every init that
    met the targets on every seed; the Thai column's gap to zeros after the mixed run."""
    inits: dict[str, dict[str, Any]] = result["inits"]
    columns = [
        ("en_step0_cost", "{:+.3f}"),
        ("p_new_en_step0", "{:.1%}"),
        ("th_step0", "{:.2f}"),
        ("en_final_cost", "{:+.3f}"),
        ("th_final", "{:.2f}"),
    ]
    lowest = {key: min(row[key] for row in inits.values()) for key, _ in columns}
    rows = []
    compared = 0
    for name, row in inits.items():
        cells = []
        for key, form in columns:
            text = form.format(row[key])
            if key == "th_final" and name != BASELINE and row.get("th_final_vs_zeros") is not None:
                text += f" ({row['th_final_vs_zeros']:+.2f}{' vs zeros' if compared == 0 else ''})"
                compared += 1
            cells.append(f"**{text}**" if row[key] == lowest[key] else text)
        title = f"**`{name}`**" if row["meets_targets_every_seed"] else f"`{name}`"
        rows.append(f"| {title} | {' | '.join(cells)} |")
    return rows
