"""Writes examples/walkthrough.ipynb (the notebook is generated: edit this file, then run it).

    python examples/build_walkthrough.py            # the cells only
    python examples/build_walkthrough.py --execute  # and run it in examples/, as Jupyter would, saving
                                                    # its outputs into the file (a few minutes on 2 CPUs)

tests/test_notebook.py checks that the saved notebook's code is this file's and that its outputs are
there and hold no error."""

import argparse
import os
import sys

import nbformat as nbf

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "walkthrough.ipynb")

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
CELLS = [
md("""# medclf walkthrough: train, score, evaluate and explain a medical-image classifier with Ray

This notebook runs the whole medclf workflow on a laptop-sized problem, top to bottom, in a few
minutes on 2 CPUs. It is written for someone new to Ray, to medical imaging, or to both.

**Ray** runs Python functions and classes on many processes or machines. medclf uses two of its
libraries: **Ray Train** (several training processes, each with a copy of the model, averaging
their gradients) and **Ray Data** (a stream of files flowing through decoding tasks and a pool of
model-holding processes, so an archive of a million scans never has to fit in memory). Here Ray
runs inside this notebook's process; on a cluster the same calls run across machines.

**The data** are *phantoms*: synthetic chest-film-like images that medclf generates, with soft
opacities ("lesions") in the `POSITIVE` class. Because we made them, we know exactly where every
lesion is, which lets us check what the model looks at. If the real Kermany chest X-rays are in
`../shared/data`, a last section trains on a small real subset too."""),
code("""import os, tempfile, glob
import pandas as pd
import matplotlib.pyplot as plt
from IPython.display import Image, Markdown, display

from medclf.config import load_config
from medclf.data.phantoms import PATIENT_REGEX, generate
from medclf.ops.runs import init_ray

# The repository root, whether Jupyter started in examples/ (its default: the notebook's folder) or in the root.
repo = next(p for p in (os.getcwd(), os.path.dirname(os.getcwd())) if os.path.isfile(os.path.join(p, "configs", "quick.yaml")))
work = tempfile.mkdtemp(prefix="medclf-walkthrough-")
print("working folder:", work)"""),
md("""## 1. Data

`generate` writes PNG and DICOM files into `<root>/<split>/<CLASS>/`, plus a manifest with each
image's label, patient id and lesion positions. A real archive looks the same to medclf: a folder
per class (or a manifest with a `path` and `label` column). File names carry the patient id, and
medclf keeps every patient's images on one side of the train/validation split: images of one
patient look alike, and splitting them would flatter the validation figures."""),
code("""root = os.path.join(work, "phantoms")
generate(root, n_train=480, n_test=60, image_size=64, seed=0)
manifest = pd.read_parquet(os.path.join(root, "manifest.parquet"))
display(manifest.groupby(["split", "label", "format"]).size().unstack())

fig, axes = plt.subplots(1, 6, figsize=(12, 2.4))
for ax, (_, row) in zip(axes, manifest[manifest.format == "png"].groupby("label").head(3).iterrows()):
    ax.imshow(plt.imread(os.path.join(root, row.path)), cmap="gray"); ax.set_title(row.label, fontsize=9); ax.axis("off")
plt.show()"""),
md("""## 2. Configuration

Every medclf job is driven by one config: YAML validated into typed objects, so a typo fails at
once with the key named. Here we start from `configs/demo.yaml` (what `make demo` runs) and
override a few keys, exactly as `--set key=value` does on the command line. Training and scoring take
the PNG files (the phantoms come as DICOM too; a night that brings a format validation never had is
one the drift report flags). The model is small (a 4-layer CNN at 64 px) so training takes a minute;
the real configs in `configs/` use ImageNet-pretrained EfficientNet-Lite0 at 224 px."""),
code("""cfg = load_config(os.path.join(repo, "configs", "demo.yaml"), [
    f"data.root={root}", "score.extensions=[.png]", "score.cpus_per_actor=0.5", "score.uids=drop",
    f"run.root={os.path.join(work, 'runs')}", "run.name=walkthrough",
])
print(cfg.train.model_dump_json(indent=1)[:400])
init_ray(cfg)   # a local Ray in this process (on a cluster: it joins the cluster instead)"""),
md("""## 3. Train with Ray Train

`run_training` splits the data by patient, decodes every image once with the same preprocessing
function scoring uses (so training and serving cannot drift apart), and starts a `TorchTrainer`:
two worker processes, each training on its half of every batch. After each epoch the workers
validate, and the best epoch is kept. Then the model is **calibrated** (a temperature fitted on
validation, so a probability of 0.8 means right about 80% of the time) and a decision
**threshold** is chosen on validation."""),
code("""from medclf.train.driver import run_training

run_dir = os.path.join(work, "runs", "train")
result = run_training(cfg, run_dir)
history = result.history
display(history[["epoch", "train_loss", "val_loss", "val_accuracy", "val_roc_auc"]])

fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
a.plot(history.epoch, history.train_loss, label="train"); a.plot(history.epoch, history.val_loss, label="validation")
a.set_xlabel("epoch"); a.set_ylabel("loss"); a.legend()
b.plot(history.epoch, history.val_roc_auc); b.set_xlabel("epoch"); b.set_ylabel("validation ROC AUC")
plt.tight_layout(); plt.show()
card = result.card
print("model id:", card.model_id, "| threshold:", round(card.threshold, 3), f"({card.threshold_rule})",
      "| temperature:", round(card.temperature, 3))"""),
md("""On phantoms the validation images are perfectly separated, so no temperature can be fitted (any
finite one would only make the model more overconfident): medclf says so in a warning and keeps
T = 1 rather than report a temperature stuck at a bound. The real subset at the end gets a fitted one.

The training run folder holds the **model artifact** (`model/`: weights, `model.json` and a
human-readable `MODEL_CARD.md`), the per-epoch history and the validation report. The model card
says what the model is for, what data it saw and how well it did, with confidence intervals.
Note what the validation figures are: images held out from the *same* archive. A new hospital's
scans are usually harder."""),
code("""text = open(os.path.join(result.model_path, "MODEL_CARD.md")).read()
display(Markdown(text.split("## Calibration")[0][:2500]))"""),
md("""## 4. Score an archive with Ray Data

Scoring streams the files through Ray Data: read + checksum + decode + preprocess in tasks, the
model in a pool of actors (processes that load the model once and keep it), and writes one
Parquet row per image with its provenance (path, sha256, model id, run id). A file that cannot be
decoded becomes a row with `status = error` and the reason; the night goes on. Running it again
over the same folder scores nothing twice."""),
code("""from medclf.data.predictions import read_predictions
from medclf.score.batch import run_scoring

test_folder = os.path.join(root, "test")
predictions = os.path.join(work, "predictions")
summary = run_scoring(cfg, "night-1", test_folder, result.model_path, predictions)
print(summary)
pred = read_predictions(predictions)
display(pred[["path", "format", "predicted_label", "prob_POSITIVE", "status", "model_id"]].head(8))
again = run_scoring(cfg, "night-2", test_folder, result.model_path, predictions)
print("second run:", again.scored, "scored,", again.already_scored, "already scored")"""),
md("""## 5. Evaluate against labels

Evaluation joins the predictions with the true labels (here, the phantom manifest) and writes
accuracy, sensitivity (recall of `POSITIVE`), specificity, ROC and PR AUC, calibration, each with
a bootstrap 95% confidence interval, plus plots: the ROC curve, the confusion matrix, a
reliability diagram and a gallery of the most confident mistakes."""),
code("""from medclf.report.evaluate import run_evaluation

test = manifest[(manifest.split == "test") & (manifest.format == "png")]  # the files scored above
labels = test.assign(path=[os.path.join(root, p) for p in test.path])[["path", "label"]]
labels_file = os.path.join(work, "labels.csv"); labels.to_csv(labels_file, index=False)
report_dir = os.path.join(work, "report")
report = run_evaluation(predictions, report_dir, card.classes, card.positive_class, labels_file, bootstrap_resamples=200)
m = report.metrics.iloc[0]
print(f"accuracy {m.accuracy:.3f} ({m.accuracy_ci_low:.3f}-{m.accuracy_ci_high:.3f}), "
      f"sensitivity {m.sensitivity:.3f}, specificity {m.specificity:.3f}, ROC AUC {m.roc_auc:.3f}")
display(Image(os.path.join(report_dir, "roc.png"), width=320), Image(os.path.join(report_dir, "confusion.png"), width=320))
display(Image(os.path.join(report_dir, "gallery.png"), width=640))"""),
md("""## 6. Explain: Grad-CAM

Grad-CAM highlights the part of the image that pushed the model toward its answer. For the
phantoms we know where the lesions are, so we can see whether the model looks at them. For a real
scan, a heatmap on the lung field supports a flag; one on a text marker or the image border is a
warning sign that the model learned a shortcut."""),
code("""from medclf.report.gradcam import run_explain

flagged = pred[(pred.predicted_label == "POSITIVE") & (pred.status == "ok")].path.head(4).tolist()
index = run_explain(flagged, result.model_path, os.path.join(work, "cam"), target="predicted", cpus_per_actor=0.5)
display(index[["probability", "peak_x", "peak_y", "status"]])
for png in index.heatmap_png.head(2):
    display(Image(png, width=360))"""),
md("""## 7. Watch every night: a drift report

A nightly archive has no labels, so nobody can re-measure accuracy on it. What we can check is
whether tonight's images and answers still look like the validation images the model was judged
on. Training stored that **reference** in the model artifact (intensity statistics, image sizes,
format and modality mix, calibrated scores, `ood_score`s, and a few principal components of the
model's internal representation, its *embedding*); scoring wrote the same statistics for every
image as extra columns. `run_drift` compares the two, one test per statistic, and flags a
statistic only when the difference is both significant after correcting for testing many things
at once and large enough to matter.

First the night we already scored (same kind of images as validation: expect no flag, or a rare
false alarm), then a night whose images went through a different processing preset: every image
brightened with a gamma curve (`u -> u**0.8`), as a new detector or export setting might do."""),
code("""from medclf.config import DriftConfig
from medclf.monitor.drift import run_drift
from medclf.data.phantoms import write_shifted

quiet = run_drift(DriftConfig(), result.model_path, predictions, os.path.join(work, "drift-night-1"), run_id="night-1")
print("night-1 flags:", quiet.flagged or "none")

shifted = write_shifted(sorted(pred.path[pred.format == "png"]), os.path.join(work, "tonight"), gamma=0.8)
print(run_scoring(cfg, "night-3", os.path.join(work, "tonight"), result.model_path, predictions))
drift = run_drift(DriftConfig(), result.model_path, predictions, os.path.join(work, "drift-night-3"), run_id="night-3")
print("night-3 flags:", drift.flagged)
display(drift.table[["statistic", "value", "reference", "test", "p_adjusted", "psi", "flag"]].round(4))
display(Image(os.path.join(work, "drift-night-3", "drift_histograms.png"), width=720))"""),
md("""The intensity statistics flag: tonight's images are brighter than validation's, and the red
titles in the histograms show where. `medclf drift` (or `score.drift_report: true` in the nightly
config) writes the same report as `drift.parquet`, PNGs and `drift.html`, and exits with status 4
when anything flags, so the scheduler can page someone. docs/usage.md ("Drift reports") says what
each flag means and what to do about it."""),
md("""## 8. A small real subset (when `../shared/data` is present)

The same calls on real paediatric chest X-rays (Kermany et al. 2018): 200 films, a few epochs of
the small CNN. Too small to be a good model; it shows that nothing above was phantom-specific.
The real recipe is `configs/pneumonia_xray.yaml` (ImageNet transfer, 224 px, family-held-out
validation)."""),
code("""real = os.path.abspath(os.path.join(repo, "..", "shared", "data", "chest_xray", "train"))
if os.path.isdir(real):
    import shutil
    subset = os.path.join(work, "real")
    for cls in ("NORMAL", "PNEUMONIA"):
        os.makedirs(os.path.join(subset, cls))
        for f in sorted(glob.glob(os.path.join(real, cls, "*.jpeg")))[:100]:
            shutil.copy(f, os.path.join(subset, cls))
    real_cfg = load_config(os.path.join(repo, "configs", "quick.yaml"), [f"data.root={subset}", "train.epochs=2",
                           f"run.root={os.path.join(work, 'runs')}", "train.max_minutes=3"])
    real_result = run_training(real_cfg, os.path.join(work, "runs", "real"))
    v = real_result.card.metrics["validation"]
    print(f"real subset, validation ({v['n']} films): ROC AUC {v['roc_auc']:.3f}, accuracy {v['accuracy']:.3f}")
else:
    print("../shared/data not found: skipping the real subset")"""),
md("""## Where next

- `jobs/train.py`, `jobs/score.py`, `jobs/evaluate.py`, `jobs/explain.py`: the same steps as
  scripts, submitted to a cluster with `ray job submit` (README, "Run on a Ray cluster").
- `medclf serve`: one answer per request over HTTP, with the same decoding and model.
- `docs/results.md`: what each recipe scored, on which data, with confidence intervals."""),
]


def build() -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb["cells"] = CELLS
    nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def execute(nb: nbf.NotebookNode, folder: str = HERE, timeout: int = 900) -> nbf.NotebookNode:
    """Run every cell with the kernel started in `folder` (Jupyter starts it in the notebook's folder)."""
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": folder}}).execute()
    return nb


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--execute", action="store_true", help="run it in examples/ and save the outputs")
    args = parser.parse_args()
    notebook = execute(build()) if args.execute else build()
    nbf.write(notebook, OUT)
    print(f"wrote {OUT}" + (" with outputs" if args.execute else ""), file=sys.stderr)
