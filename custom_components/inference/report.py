"""Pictures of a run: prediction overlays against labels and loss / score curves from TensorBoard logs.

``python -m custom_components.inference.report --run_dir RUN --image_dir DIR --pred_dir DIR [--label_dir DIR] --out DIR``
writes ``overlay.png`` (three orthogonal mid slices per volume: image, label, prediction) and
``loss_curves.png`` (total loss, each ``loss/<term>`` and the validation score per epoch).
"""

from __future__ import annotations

import argparse
import glob
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from custom_components.data.io import read_volume  # noqa: E402

__all__ = ["read_scalars", "plot_curves", "plot_overlays"]


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the TensorBoard event files under ``log_dir``: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}


def plot_curves(log_dir: str, out_png: str) -> str:
    scalars = read_scalars(log_dir)
    if not scalars:
        raise ValueError(f"no TensorBoard scalars under {log_dir}.")
    terms = sorted(t for t in scalars if t.startswith("loss/"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if "train_loss" in scalars:
        s, v = zip(*scalars["train_loss"])
        axes[0].plot(s, v, lw=0.8)
    axes[0].set(title="total loss per iteration", xlabel="iteration")
    for t in terms:
        s, v = zip(*scalars[t])
        axes[1].plot(s, v, marker=".", label=t[5:])
    axes[1].set(title="loss terms (epoch mean, weighted)", xlabel="epoch")
    axes[1].legend(fontsize=7)
    for t in [t for t in scalars if t.startswith("val_")]:
        s, v = zip(*scalars[t])
        axes[2].plot(s, v, marker="o", label=t)
    axes[2].set(title="validation", xlabel="epoch")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def plot_overlays(image_dir: str, pred_dir: str, out_png: str, label_dir: str | None = None, max_volumes: int = 2) -> str:
    ids = sorted(os.path.splitext(f)[0] for f in os.listdir(pred_dir) if f.endswith(".tif"))[:max_volumes]
    if not ids:
        raise ValueError(f"no predictions (.tif) in {pred_dir}.")
    fig, axes = plt.subplots(len(ids), 3, figsize=(12, 4 * len(ids)), squeeze=False)
    for row, vid in enumerate(ids):
        image = read_volume(os.path.join(image_dir, f"{vid}.tif"))
        pred = read_volume(os.path.join(pred_dir, f"{vid}.tif"))
        label = read_volume(os.path.join(label_dir, f"{vid}.tif")) if label_dir else None
        for col, axis in enumerate(range(3)):
            idx = image.shape[axis] // 2
            take = lambda a: np.take(a, idx, axis=axis)  # noqa: E731
            ax = axes[row, col]
            ax.imshow(take(image), cmap="gray")
            if label is not None:
                lab = take(label)
                ax.contour(lab == 1, levels=[0.5], colors="lime", linewidths=0.8)
                ax.imshow(np.ma.masked_where(lab != 2, lab), cmap="Greys", alpha=0.25, vmin=0, vmax=2)
            ax.imshow(np.ma.masked_where(take(pred) == 0, take(pred)), cmap="autumn", alpha=0.5)
            ax.set_title(f"{vid} axis {axis} slice {idx}: red = prediction, green = label 1")
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True)
    p.add_argument("--image_dir", required=True)
    p.add_argument("--pred_dir", required=True)
    p.add_argument("--label_dir", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    print(plot_overlays(a.image_dir, a.pred_dir, os.path.join(a.out, "overlay.png"), a.label_dir))
    print(plot_curves(os.path.join(a.run_dir, "tensorboard"), os.path.join(a.out, "loss_curves.png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
