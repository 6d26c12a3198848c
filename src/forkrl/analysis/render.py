"""Whole responses as HTML with every token coloured by its entropy (paper 1, Figs. 12-17).

Each token is a `<span>` whose background comes from a colour map over [0, vmax] and whose
`title` (shown on hover) holds its entropy. All text is HTML-escaped; whitespace and newlines
are kept (`white-space: pre-wrap`), so the response reads as it was generated.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ColouredResponse", "entropy_colours", "render_responses_html"]

COLOUR_MAP = "YlOrRd"
"""Pale yellow for near-deterministic tokens, dark red for forking tokens."""


@dataclass
class ColouredResponse:
    """One response to render: its tokens and their entropies."""

    sample_id: int
    prompt_index: int
    prompt: str
    pieces: Sequence[str]
    """Decoded text of each response token, in order."""
    entropy: np.ndarray
    """Entropy of each token, `[len(pieces)]`."""
    reward: float | None = None


def entropy_colours(entropy: np.ndarray, vmax: float) -> list[tuple[str, str]]:
    """`(background, text)` hex colours per token: the colour map over [0, vmax] (values above
    vmax get the top colour) and black or white text, whichever contrasts more."""
    from matplotlib import colormaps

    scaled = np.clip(np.asarray(entropy, dtype=np.float64) / max(vmax, 1e-12), 0.0, 1.0)
    rgba = colormaps[COLOUR_MAP](scaled)  # (N, 4) in [0, 1]
    out = []
    for r, g, b, _ in rgba:
        luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
        out.append((_hex(r, g, b), "#000000" if luminance > 0.45 else "#ffffff"))
    return out


def render_responses_html(
    responses: Sequence[ColouredResponse],
    vmax: float,
    title: str = "Token entropy of sampled responses",
    subtitle: str = "",
) -> str:
    """A standalone HTML page with a colour-bar legend and one block per response."""
    from matplotlib import colormaps

    cmap = colormaps[COLOUR_MAP]
    stops = ", ".join(_hex(*cmap(x)[:3]) for x in np.linspace(0.0, 1.0, 11))
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>",
        "body { font-family: sans-serif; margin: 2em; max-width: 70em; }",
        ".response { white-space: pre-wrap; font-family: monospace; line-height: 1.7;"
        " border: 1px solid #ddd; padding: 0.8em; }",
        ".tok { border-radius: 2px; }",
        ".legend { display: flex; align-items: center; gap: 0.5em; margin: 1em 0; }",
        f".bar {{ width: 24em; height: 1em; background: linear-gradient(to right, {stops}); }}",
        "pre.prompt { white-space: pre-wrap; background: #f6f6f6; padding: 0.5em; }",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f"<p>{html.escape(subtitle)}</p>")
    parts.append(
        '<div class="legend"><span>entropy 0</span><span class="bar"></span>'
        f"<span>&ge; {vmax:.3g} (nats)</span></div>"
        "<p>Hover over a token to see its entropy.</p>"
    )
    for resp in responses:
        reward = "" if resp.reward is None else f", reward {resp.reward:g}"
        parts.append(
            f"<h2>Sample {resp.sample_id} (prompt {resp.prompt_index}): "
            f"{len(resp.pieces)} tokens, mean entropy {float(np.mean(resp.entropy)) if len(resp.pieces) else 0.0:.3f}"
            f"{reward}</h2>"
        )
        parts.append(
            f'<details><summary>Prompt</summary><pre class="prompt">{html.escape(resp.prompt)}</pre></details>'
        )
        spans = []
        for piece, h, (bg, fg) in zip(resp.pieces, resp.entropy, entropy_colours(resp.entropy, vmax)):
            spans.append(
                f'<span class="tok" style="background:{bg};color:{fg}" title="H={float(h):.4f}">'
                f"{html.escape(piece, quote=True)}</span>"
            )
        parts.append('<div class="response">' + "".join(spans) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _hex(r: float, g: float, b: float) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(round(255 * c)) for c in (r, g, b)))
