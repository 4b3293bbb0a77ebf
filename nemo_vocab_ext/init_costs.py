"""What each init costs, as measured: read from the result file packaged with this module.

``measured/quality.json`` holds the init-quality experiment's numbers (``tools/quality.py --publish``
writes it) and what they were measured on: per init and base style, each metric's mean over
independently pretrained bases with a 95% interval. The resize report quotes them with that label, and
the README's "Which init: measured" block is :func:`readme_block` of them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from .core.rows import Init

RESULT_FILE = "measured/quality.json"
STYLE_NAMES = {"gpt2": "GPT-2 style", "llama": "Llama style"}


@lru_cache(maxsize=1)
def measured() -> dict[str, Any]:
    """The packaged result file, parsed (read once)."""
    return json.loads(resources.files(__package__).joinpath(RESULT_FILE).read_text(encoding="utf-8"))


def measured_on(result: dict[str, Any]) -> str:
    """What the numbers were measured on, in a few words."""
    model, styles, bases = result["model"], result["styles"], len(result["bases"])
    kinds = " and ".join(STYLE_NAMES.get(s, s) for s in styles)
    base, new = result["data"]["base"], result["data"]["new"]
    return (
        f"tiny {kinds} models ({model['layers']} layers, hidden {model['hidden']}; {bases} pretraining "
        f"seed{'s' if bases != 1 else ''} each), {base['language']} ({base['text']}) + "
        f"{new['language']} ({new['text']})"
    )


def _span(m: dict[str, Any], form: str) -> str:
    return f"{form.format(m['mean'])} [{form.format(m['lo'])}, {form.format(m['hi'])}]"


def _thai_standing(result: dict[str, Any], init: str, style: str) -> str:
    """Where ``init`` stands on the new language after the mixed run among the measured inits."""
    rows = {name: by_style[style]["th_final"] for name, by_style in result["inits"].items()}
    best = min(rows, key=lambda name: rows[name]["mean"])
    if best == init:
        return "the best on the new language"
    return f"{rows[init]['mean'] - rows[best]['mean']:.2f} nats behind {best} on the new language"


def expected_cost(init: Init, result: dict[str, Any] | None = None) -> str:
    """The resize report's line on ``init``: its measured costs per base style, means and 95% intervals."""
    result = result or measured()
    inits: dict[str, dict[str, Any]] = result["inits"]
    label = f"measured on {measured_on(result)}"
    if str(init) not in inits:
        return f"not measured yet ({', '.join(inits)} were, {label})"
    parts = []
    for style, row in inits[str(init)].items():
        parts.append(
            f"{STYLE_NAMES.get(style, style)} {_span(row['en_step0_cost'], '{:+.3f}')} nats of base-language loss "
            f"at step 0, after {result['continual_steps']} mixed steps {_thai_standing(result, str(init), style)}"
        )
    return f"{label}: {'; '.join(parts)}"


def _cells(row: dict[str, Any], vs_default: dict[str, Any] | None) -> list[str]:
    return [
        _span(row["en_step0_cost"], "{:+.3f}"),
        f"{row['en_step0_cost_bpb']['mean']:+.4f}",
        f"{row['p_new_en_step0']['mean']:.1%}",
        f"{row['th_step0']['mean']:.2f}",
        f"{row['en_final_cost']['mean']:+.3f}",
        _span(row["th_final"], "{:.3f}"),
        f"{row['th_final_bpb']['mean']:.3f}",
        "" if vs_default is None else _span(vs_default, "{:+.3f}"),
    ]


def readme_block(result: dict[str, Any]) -> list[str]:
    """The README's measured block: what it was measured on, then a table per style and init (means over
    bases, [95% interval]); the default in bold, and each init's Thai loss minus the default's, base by base."""
    default = result["verdict"]["default"]
    steps = result["continual_steps"]
    lines = [
        f"Measured on {measured_on(result)}; {len(result['bases'])} bases per style, each pretrained "
        f"{result['pretraining_steps']} steps, extended and trained {steps} steps on the mix; "
        f"{result['runtime_seconds'] / 60:.0f} minutes on one CPU thread (`nemo_vocab_ext/measured/quality.json`):",
        "",
        f"| style | init | English cost at step 0, nats [95%] | same, bits/byte | p(new ids), English, step 0 "
        f"| Thai at step 0 | English cost after {steps} | Thai after {steps}, nats [95%] | same, bits/byte "
        f"| Thai minus `{default}`'s, paired [95%] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for style, info in result["styles"].items():
        verdict = result["verdict"]["styles"][style]
        rows = {name: by_style[style] for name, by_style in result["inits"].items()}
        rows.update(result.get("output_trials", {}).get(style, {}))
        for name, row in rows.items():
            title = f"**`{name}`**" if name == default else f"`{name}`"
            if name not in result["inits"]:
                title = f"{title} (output-layer trial)"
            cells = _cells(row, verdict["th_vs_default"].get(name) or row.get("th_vs_default"))
            if name == default:
                cells[-1] = "(the default)"
            lines.append(f"| {STYLE_NAMES.get(style, style)} | {title} | {' | '.join(cells)} |")
        base = info["base_en_loss"]
        lines.append(
            f"| {STYLE_NAMES.get(style, style)} | unextended base | held-out English {_span(base, '{:.3f}')} nats, "
            f"{info['base_en_bpb']['mean']:.3f} bits/byte; {info['base_vocab']} + {info['new_tokens']} new tokens "
            "| | | | | | | |"
        )
    return lines
