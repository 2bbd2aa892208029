"""Measured values and verdicts of the network-design claims: residuals and init, BatchNorm vs
LayerNorm, regularisation.

They read the seeded experiments' reports (`exp_residual`, `exp_norm`, `exp_regularisation`, from
`bench.experiments`). The claims' text is in `claims.yaml`; `BY_CLAIM` maps a claim id to its
(measure, judge), `HEADLINES` a headline id to its short measurement.
"""

from __future__ import annotations

import math

from bench.claims.reports import Judge, Measure, Measured, Reports, pct


def residual_depth(r: Reports) -> str:
    s = r.summary("exp_residual")
    d = s["deepest_trained"]
    return (
        f"deepest ReLU MLP (width 64, one seed) trained on digits, of depths 10/20/50/100: plain He {d['plain/he']}, "
        f"plain Xavier {d['plain/xavier']}, plain N(0,1) {d['plain/N(0,1)']}; residual He {d['residual/he']}, "
        f"residual Xavier {d['residual/xavier']}, residual N(0,1) {d['residual/N(0,1)']}"
    )


def residual_judge(r: Reports) -> tuple[str, str]:
    d = r.summary("exp_residual")["deepest_trained"]
    mx = r.summary("exp_residual")["max_depth"]
    if d["residual/he"] >= mx and d["plain/he"] < mx:
        return "holds", (
            f"on this task and budget: plain nets trained up to {d['plain/he']} layers (He init), residual nets at "
            f"{mx}; the cut-off depends on init, optimiser and budget (ResNet trained 1202 layers with BatchNorm)."
        )
    if d["residual/he"] >= mx and d["plain/he"] >= mx:
        return "holds in part", (
            f"with He init even the plain net trained at {mx} layers on this easy task; residuals make depth robust "
            "to init (see gradient norms), the '~20 layers' limit is not a fixed number."
        )
    return "does not hold", "residual nets did not train at the largest depth here."


def init_grads(r: Reports) -> str:
    rows = r["exp_residual"]["rows"]
    depths = sorted({x["depth"] for x in rows})

    def first(arch: str, init: str, depth: int) -> str:
        x = next(x for x in rows if x["arch"] == arch and x["init"] == init and x["depth"] == depth)
        value = x["grad_norm_first"]
        return "overflow" if value is None or not math.isfinite(value) or value > 1e6 else f"{value:.2g}"

    parts = [
        f"{arch} {init} {first(arch, init, depths[0])} → {first(arch, init, depths[-1])}"
        for arch, init in (("plain", "xavier"), ("plain", "he"), ("residual", "he"), ("plain", "N(0,1)"))
    ]
    return f"‖dL/dW‖ of the first hidden layer at init, depth {depths[0]} → {depths[-1]}: " + "; ".join(parts)


def norm_cnn(r: Reports) -> str:
    s = r.summary("exp_norm")["cnn_test_acc"]
    return "digits CNN test accuracy by batch size: " + "; ".join(
        f"{n}: " + ", ".join(f"b{b} {pct(v)}" for b, v in s[n].items()) for n in s
    )


def norm_cnn_judge(r: Reports) -> tuple[str, str]:
    s = r.summary("exp_norm")
    big, small = s["cnn_batchnorm_minus_layernorm_largest_batch"], s["cnn_batchnorm_minus_layernorm_smallest_batch"]
    verdict = "holds" if big >= 0 else "holds in part"
    return verdict, (
        f"BatchNorm − LayerNorm test accuracy: {100 * big:+.1f} points at batch 64, {100 * small:+.1f} at batch 2 "
        "(means of 3 seeds on one seeded split of 360 test digits: 1 digit = 0.28 points); on 8×8 images each "
        "BatchNorm statistic pools batch × 64 pixels, so even batch 2 gives it usable statistics (Wu & He 2018 show "
        "the small-batch failure on large images)."
    )


def _per_seed_diff(r: Reports, task: str, batch: int) -> list[float]:
    rows = {x["norm"]: x for x in r["exp_norm"]["rows"] if x["task"] == task and x["batch"] == batch}
    return [b - ln for b, ln in zip(rows["batchnorm"]["per_seed"], rows["layernorm"]["per_seed"])]


def norm_lm(r: Reports) -> str:
    s = r.summary("exp_norm")
    v = s["lm_val_bpb"]
    batches = list(v["layernorm"])
    diffs = {b: ", ".join(f"{d:+.3f}" for d in _per_seed_diff(r, "byte LM", int(b))) for b in batches}
    return (
        "byte LM val bits/byte by batch (mean of seeds, equal tokens): "
        + "; ".join(f"{n}: " + ", ".join(f"b{b} {x}" for b, x in v[n].items()) for n in v)
        + "; BatchNorm − LayerNorm per seed: "
        + "; ".join(f"b{b}: {d}" for b, d in diffs.items())
    )


def norm_lm_judge(r: Reports) -> tuple[str, str]:
    s = r.summary("exp_norm")
    small, large = s["lm_batchnorm_minus_layernorm_smallest_batch"], s["lm_batchnorm_minus_layernorm_largest_batch"]
    batches = [int(b) for b in s["lm_val_bpb"]["layernorm"]]
    d_small, d_large = _per_seed_diff(r, "byte LM", batches[0]), _per_seed_diff(r, "byte LM", batches[-1])

    def consistent(ds: list[float]) -> str:
        return (
            "in every seed"
            if all(d > 0 for d in ds) or all(d < 0 for d in ds)
            else "with the sign varying across seeds"
        )

    facts = (
        f"BatchNorm − LayerNorm {small:+.3f} bits/byte at batch {batches[0]} ({consistent(d_small)}) and "
        f"{large:+.3f} at batch {batches[-1]} ({consistent(d_large)}), equal tokens"
    )
    leak = "in a causal LM, training-mode BatchNorm also mixes in statistics of future tokens"
    if small > 0 and large > 0 and small >= large:
        return "holds", f"{facts}: BatchNorm is worse, more so at small batches; {leak}."
    if small > 0 and large > 0:
        return "holds in part", (
            f"{facts}: 'use LayerNorm' holds, but BatchNorm's deficit did not grow as the batch shrank (each "
            f"statistic here pools batch × 64 positions); {leak}."
        )
    if large > 0:
        return "holds in part", (
            f"{facts}: BatchNorm fell behind only at the large batch (fewest steps), the opposite of 'needs large "
            "batches' (a causal-LM statistic pools batch × 64 positions, so even batch 2 has 128 values); the "
            f"practice (LayerNorm/RMSNorm in Transformers) stands for other reasons: no dependence between the "
            f"examples of a batch, identical train and inference behaviour; {leak}."
        )
    return "does not hold", f"{facts}: BatchNorm was not worse here."


def reg(variant: str) -> Measure:
    def measure(r: Reports) -> str:
        s = r.summary("exp_regularisation")
        return (
            f"digits MLP, 300 examples, 3 seeds: gap {s['gap_points'][variant]:.1f} points "
            f"(none: {s['gap_points']['none']:.1f}); test accuracy {pct(s['test_acc'][variant])} "
            f"(none: {pct(s['test_acc']['none'])})"
        )

    return measure


def reg_judge(variant: str) -> Judge:
    def judge(r: Reports) -> tuple[str, str]:
        s = r.summary("exp_regularisation")
        g, g0 = s["gap_points"][variant], s["gap_points"]["none"]
        a, a0 = s["test_acc"][variant], s["test_acc"]["none"]
        change = f"gap {g0:.1f} → {g:.1f} points, test accuracy {pct(a0)} → {pct(a)}"
        if g <= g0 - 1.0:
            return "holds in part", f"narrowed the gap ({change}); the sheet's values are defaults, not tuned results."
        if g < g0:
            return "does not hold", f"no effect beyond seed noise (< 1 point; {change})."
        return "does not hold", f"did not narrow the gap here ({change})."

    return judge


def gap_target(r: Reports) -> str:
    s = r.summary("exp_regularisation")["gap_points"]
    return "train − test gap, points: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items())


def gap_target_judge(r: Reports) -> tuple[str, str]:
    s = r.summary("exp_regularisation")["gap_below_5_points"]
    met = [f"'{k}'" for k, v in s.items() if v]
    below = f"variants below 5 points: {', '.join(met)}" if met else "no variant stayed below 5 points"
    return ("holds in part" if met else "does not hold"), (
        f"{below}; the regularisers did not bring the gap under the target, which is a rule of thumb, not a result."
    )


def _h_residual(r: Reports) -> str:
    d = r.summary("exp_residual")["deepest_trained"]
    return (
        f"deepest trained of 10/20/50/100: plain He {d['plain/he']}, plain Xavier {d['plain/xavier']}, "
        f"residual He {d['residual/he']}, N(0,1) {d['plain/N(0,1)']}"
    )


def _h_norm(r: Reports) -> str:
    s = r.summary("exp_norm")
    return (
        f"CNN: BN − LN {100 * s['cnn_batchnorm_minus_layernorm_largest_batch']:+.1f} points at batch 64, "
        f"{100 * s['cnn_batchnorm_minus_layernorm_smallest_batch']:+.1f} at batch 2; LM: BN − LN "
        f"{s['lm_batchnorm_minus_layernorm_smallest_batch']:+.3f} bits/byte at batch 2, "
        f"{s['lm_batchnorm_minus_layernorm_largest_batch']:+.3f} at batch 32 (3 seeds, equal tokens)"
    )


def _h_reg(r: Reports) -> str:
    g = r.summary("exp_regularisation")["gap_points"]
    return f"train−test gap {g['none']:.1f} points without, {g['all three']:.1f} with all three"


BY_CLAIM: Measured = {
    "residual-vanishing": (init_grads, None),
    "residual-init-formula": (init_grads, None),
    "residual-shortcut": (residual_depth, None),
    "residual-20-vs-100-layers": (residual_depth, residual_judge),
    "norm-batchnorm-cnn": (norm_cnn, norm_cnn_judge),
    "norm-layernorm-nlp": (norm_lm, norm_lm_judge),
    "norm-layernorm-batch-independent": (norm_lm, None),
    "reg-l2": (reg("L2 0.01"), reg_judge("L2 0.01")),
    "reg-dropout": (reg("dropout 0.3"), reg_judge("dropout 0.3")),
    "reg-early-stopping": (reg("early stop 5"), reg_judge("early stop 5")),
    "reg-gap-target": (gap_target, gap_target_judge),
}
HEADLINES: dict[str, Measure] = {"residual": _h_residual, "norm": _h_norm, "regularisation": _h_reg}
