"""Re-analysis of benchmarks/ood_auroc.py's saved features (--out /tmp/ood_bench100): AUROC + flag rates at q 0.99 and 0.95, same functions."""
import numpy as np
from medclf.report.metrics import bootstrap_ci
from medclf.monitor.ood import _score, fit_gaussian, out_of_fold_scores
names = ["in-domain (held-in validation chest films)", "CT/MR slices, pydicom corpus (28 files)",
         "phantom noise (6 kinds, 512 px)", "lung CT (JPEG)", "breast ultrasound (PNG)"]
z = np.load("/tmp/ood_bench100/features.npz")
feats = {n: (z[f"f{i}"], z[f"l{i}"]) for i, n in enumerate(names)}
fit_f, fit_l, fit_y = z["fit_f"], z["fit_l"], z["fit_y"]
variants = {"mahalanobis (all 1280 dims)": ("mahalanobis", None), "mahalanobis (PCA 64)": ("mahalanobis", 64),
            "mahalanobis (PCA 128)": ("mahalanobis", 128), "energy": ("energy", None),
            "max_softmax": ("max_softmax", None)}
print("| score | set | n | AUROC (95% CI) | flagged at q=0.99 | flagged at q=0.95 |")
print("|---|---|---|---|---|---|")
for variant, (kind, pca) in variants.items():
    arrays = fit_gaussian(fit_f, fit_y, pca) if kind == "mahalanobis" else {}
    oof = out_of_fold_scores(kind, fit_f, fit_l, fit_y, pca)
    t99, t95 = np.quantile(oof, 0.99), np.quantile(oof, 0.95)
    scores = {n: _score(kind, arrays, f, lg) for n, (f, lg) in feats.items()}
    inside = scores[names[0]]
    print(f"| {variant} | {names[0]} | {len(inside)} | - | {100*(inside > t99).mean():.1f}% | {100*(inside > t95).mean():.1f}% |")
    for n in names[1:]:
        s = scores[n]
        y = np.r_[np.zeros(len(inside)), np.ones(len(s))]
        zz = np.r_[inside, s] - t99
        p = 1 / (1 + np.exp(-np.clip(zz / (np.std(zz) + 1e-12), -50, 50)))
        ci = bootstrap_ci(y, p, 0.5, 1000, seed=0).set_index("metric")
        print(f"| {variant} | {n} | {len(s)} | {ci.loc['roc_auc','estimate']:.3f} ({ci.loc['roc_auc','ci_low']:.3f}-{ci.loc['roc_auc','ci_high']:.3f}) | {100*(s > t99).mean():.1f}% | {100*(s > t95).mean():.1f}% |")
