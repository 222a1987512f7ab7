"""The traced workspace coefficients of the shipped model options, as the planner reads them.

Reads the workspace models shipped with each option's anatomy (`glmdeploy.model.workspace_cache`,
traced by `python -m glmdeploy.model.shipped_anatomies`; no torch here) and prints a Markdown
table: per unit kind, the peak's bytes per prompt token of one sequence (bf16 and fp32, CUDA
target), the historical formula's, and the workspace of a GPU that runs that kind at a 32k-token
context (`runtime=long-context`: 32768 − 256 prompt tokens, batch 1).

    python benchmarks/workspace_coefficients.py
"""

from __future__ import annotations

from glmdeploy.config.settings import GIB, Dtype
from glmdeploy.model.anatomy_cache import anatomy_for
from glmdeploy.model.shipped_anatomies import shipped_models
from glmdeploy.model.workspace import formula_activations, formula_logits
from glmdeploy.model.workspace_cache import workspace_for

PROMPT = 32768 - 256  # runtime=long-context: max_context_tokens − max_new_tokens


def main() -> None:
    print(
        "| model | kind (layers) | bf16 B/token | fp32 B/token | formula bf16 B/token | ratio "
        "| GPU running it at 32k, bf16 (formula) |"
    )
    print("|---|---|---|---|---|---|---|")
    names: dict[str, list[str]] = {}  # options with one skeleton share their workspace
    options = {n: o for n, o in shipped_models().items() if n != "tiny-glm"}
    for name, option in options.items():
        names.setdefault(anatomy_for(option).config_hash, []).append(name)
    for group in names.values():
        name, option = " = ".join(group), options[group[0]]
        anatomy = anatomy_for(option)
        bf16 = workspace_for(option, anatomy, Dtype.BF16, target="cuda")
        fp32 = workspace_for(option, anatomy, Dtype.FP32, target="cuda")
        assert bf16.method == fp32.method == "traced", name
        activations = formula_activations(anatomy, Dtype.BF16)
        logits = formula_logits(anatomy, Dtype.BF16)
        for kind, kind32 in zip(bf16.kinds, fp32.kinds, strict=True):
            lead, lead32 = kind.leading(PROMPT), kind32.leading(PROMPT)
            old = activations.bytes(PROMPT) + (logits.bytes(PROMPT) if kind.kind == "head" else 0)
            layers = f" ({len(kind.layers)})" if kind.layers else ""
            block = kind.kind != "head"  # the head's formula was A + L: no per-token ratio
            formula = f"{activations.per_token:,}" if block else ""
            ratio = f"{lead.per_token / activations.per_token:.2f}" if block else ""
            print(
                f"| {name} | {kind.kind}{layers} | {lead.per_token:,} | {lead32.per_token:,} "
                f"| {formula} | {ratio} | {kind.bytes(PROMPT) / GIB:.2f} GiB ({old / GIB:.2f}) |"
            )


if __name__ == "__main__":
    main()
