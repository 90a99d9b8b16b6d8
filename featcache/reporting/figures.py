"""The report's figures, drawn with matplotlib from run records and images.

Flow: records / explain -> **figures** -> page. Each function returns PNG bytes, which the
report embeds as a data URI, so the page needs no network access and no side files.
"""

from __future__ import annotations

import io

import numpy as np

GOOD, BAD = "#1a7f37", "#cf222e"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's first import
    import matplotlib.pyplot as plt

    return plt


def png(fig, tight: bool = True) -> bytes:
    """The figure as PNG bytes. ``tight``: cropped to what is drawn (legends and labels outside the axes); a
    figure whose ``tight_layout`` already holds everything passes False (the crop doubles a save's cost)."""
    plt = _plt()
    for ax in fig.axes:  # values a person reads: 0.99999 and 1.00001, never "1e-5 + 1" at the axis' end
        for axis in (ax.xaxis, ax.yaxis):
            formatter = axis.get_major_formatter()
            if hasattr(formatter, "set_useOffset"):
                formatter.set_useOffset(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return buffer.getvalue()


def curves(history: dict) -> bytes:
    """Accuracy and loss per epoch, train and validation; phase 2 shaded for fine-tuned runs."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3))
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    for ax, metric in zip(axes, ("acc", "loss")):
        for split, style in (("train", "-o"), ("val", "--s")):
            values = history.get(f"{split}_{metric}") or []
            if values:
                ax.plot(epochs[: len(values)], values, style, markersize=3, label=split)
        phases = history.get("phase")
        if phases and "head" in phases and "finetune" in phases:
            start = phases.index("finetune") + 0.5
            ax.axvspan(start, len(phases) + 0.5, color="0.92", zorder=0, label="fine-tune phase")
        ax.set_xlabel("epoch")
        if len(epochs) <= 12:
            ax.set_xticks(epochs)  # epochs are whole: no 1.5
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, len(epochs) + 0.5)  # one epoch: one tick in the middle, not a 0.96-1.04 axis
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig, tight=False)


def confusion(matrix, classes) -> bytes:
    plt = _plt()
    matrix = np.asarray(matrix)
    k = len(classes)
    size = min(6.0, 1.8 + 0.32 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=90 if k > 4 else 0, fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        top = matrix.max() or 1
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > top / 2 else "black")
    fig.tight_layout()
    return png(fig, tight=False)


def per_class(per_class_metrics: dict) -> bytes:
    plt = _plt()
    names = list(per_class_metrics)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 2), 2.8))
    ax.bar(x - 0.2, [per_class_metrics[n]["precision"] for n in names], 0.4, label="precision")
    ax.bar(x + 0.2, [per_class_metrics[n]["recall"] for n in names], 0.4, label="recall")
    ax.set_xticks(x, names, rotation=90 if len(names) > 6 else 0, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncols=2, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)  # above the bars
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return png(fig, tight=False)


def image_grid(images, titles, colors=None, columns: int = 6, cell: float = 1.7) -> bytes:
    """Images (N, H, W, 3) uint8 or float in [0, 1] with a title each, ``cell`` inches wide (at 100 dpi)."""
    canvas, _ = grid_image(images, titles, colors, columns, cell)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def grid_image(images, titles, colors=None, columns: int = 6, cell: float = 1.7):
    """The picture of :func:`image_grid`, composed with Pillow (a grid of matplotlib axes cost a second a report
    section; this costs milliseconds), and each cell's (title box, image box) in pixels: each row is tall enough
    for its titles' lines, so no title reaches into an image."""
    from PIL import Image, ImageDraw

    n = len(images)
    cols = min(columns, max(n, 1))
    rows = max(1, -(-n // columns))
    px = int(round(cell * 100))
    pad = max(4, px // 20)
    side = px - 2 * pad
    font = _font(11)
    line = font.getbbox("Ag✓")[3] + 3
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    title = lines * line + pad
    canvas = Image.new("RGB", (cols * px, rows * (title + side + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y0 = c * px + pad, r * (title + side + pad)
        tile = Image.fromarray(_uint8(images[i]))
        scale = side / max(tile.size)
        size = (max(1, round(tile.size[0] * scale)), max(1, round(tile.size[1] * scale)))
        tile = tile.resize(size, Image.NEAREST if max(tile.size) < 64 else Image.BILINEAR)
        image_box = (x0 + (side - size[0]) // 2, y0 + title, x0 + (side - size[0]) // 2 + size[0], y0 + title + size[1])
        canvas.paste(tile, image_box[:2])
        color = colors[i] if colors else "black"
        text = titles[i].split("\n")
        top = y0 + (title - pad - len(text) * line) + pad // 2
        for k, part in enumerate(text):
            width = draw.textlength(part, font=font)
            draw.text((x0 + (side - width) / 2, top + k * line), part, fill=color, font=font)
        title_box = (x0, top, x0 + side, top + len(text) * line)
        boxes.append((title_box, image_box))
    return canvas, boxes


def _uint8(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image * (255.0 if image.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)


def _font(size: int):
    """matplotlib's DejaVu Sans (it has the check and cross marks), at ``size`` pixels; Pillow's own font where
    that file cannot be found."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (OSError, ImportError, ValueError):
        return ImageFont.load_default()


def predictions(images, true, predicted, classes) -> bytes:
    """Test images with predicted and true labels; correct ones green with a check mark, wrong ones red."""
    titles, colors = [], []
    for t, p in zip(true, predicted):
        ok = t == p
        titles.append(f"{'✓' if ok else '✗'} {classes[p]}" + ("" if ok else f"\n(true {classes[t]})"))
        colors.append(GOOD if ok else BAD)
    return image_grid(images, titles, colors)


def gradcam_grid(images, overlays: dict, true, predicted, classes, map_sizes: dict | None = None,
                 empty: dict | None = None) -> bytes:
    """One row per image: the image, then its Grad-CAM heatmap for each tap, with the size of the map it
    was computed on below; a heatmap with all-zero gradients shows the plain image and says so."""
    plt = _plt()
    taps = list(overlays)
    n = len(images)
    map_sizes, empty = map_sizes or {}, empty or {}
    fig, axes = plt.subplots(n, 1 + len(taps), figsize=(1.8 * (1 + len(taps)), 2.2 * n), squeeze=False)
    for i in range(n):
        ok = true[i] == predicted[i]
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_title(f"true {classes[true[i]]}\npred {classes[predicted[i]]}", fontsize=7,
                             color=GOOD if ok else BAD)
        for j, tap in enumerate(taps, start=1):
            blank = empty.get(tap, [False] * n)[i]
            axes[i, j].imshow(images[i] * 0.35 + 0.65 if blank else overlays[tap][i])
            if i == 0:
                axes[i, j].set_title(f"Grad-CAM\n{tap}", fontsize=7)
            size = map_sizes.get(tap)
            below = "empty: all-zero gradients" if blank else ""
            if size:
                below = f"{size[0]}x{size[1]} map" + (f"; {below}" if below else "")
            axes[i, j].text(0.5, -0.04, below, transform=axes[i, j].transAxes, ha="center", va="top", fontsize=6,
                            color=BAD if blank else "0.3")
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    return png(fig)


def architecture(backbones: list[dict], pooling: str, tap_norm: str, fused_dim: int, refine: str | None,
                 head: list[str]) -> bytes:
    """Boxes and arrows: backbones -> taps (with dimensions) -> pooling -> normalisation -> concat -> head.

    ``backbones`` is ``[{"name", "note", "taps": [(tap, text)]}]``; ``head`` the head's layers as text.
    """
    plt = _plt()
    from matplotlib.patches import FancyBboxPatch

    rows = [(b["name"], tap, text) for b in backbones for tap, text in b["taps"]]
    height = max(len(rows), len(head), 2)
    fig, ax = plt.subplots(figsize=(11, 0.75 * height + 0.8))
    ax.set_xlim(0, 11)
    ax.set_ylim(-0.7, height - 0.3)
    ax.axis("off")

    def box(x, y, text, color, width=1.9, height=0.56):
        ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.04",
                                    facecolor=color, edgecolor="0.3"))
        ax.text(x, y, text, ha="center", va="center", fontsize=7.5)

    def arrow(x0, y0, x1, y1):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "0.35"})

    ys = np.linspace(height - 1, 0, len(rows)) if len(rows) > 1 else np.array([(height - 1) / 2])
    mid = (height - 1) / 2
    for b in backbones:
        own = [y for (name, _, _), y in zip(rows, ys) if name == b["name"]]
        yb = float(np.mean(own))
        box(1.0, yb, f"{b['name']}\n{b['note']}", "#dbe9f6", height=0.7)
        for y in own:
            arrow(1.95, yb, 2.55, y)
    for (name, tap, text), y in zip(rows, ys):
        box(3.5, y, f"{tap}\n{text}", "#e8f3e8")
        step = f"{refine} ->\n" if refine else ""
        box(5.6, y, f"{step}{pooling} pool -> {tap_norm}", "#f6eddb", width=2.0)
        arrow(4.45, y, 4.6, y)
        arrow(6.6, y, 7.05, mid)
    box(7.7, mid, f"concatenate\n{fused_dim}" if len(rows) > 1 else f"one tap\n{fused_dim}", "#f3e1ee", width=1.2)
    spacing = 0.75 if len(head) > 1 else 0
    hy = np.linspace(mid + spacing * (len(head) - 1) / 2, mid - spacing * (len(head) - 1) / 2, len(head))
    for i, (layer, y) in enumerate(zip(head, hy)):
        box(9.75, y, layer, "#ececec", width=2.1)
        if i:
            arrow(9.75, hy[i - 1] - 0.3, 9.75, y + 0.3)
    arrow(8.32, mid, 8.68, hy[0])  # concatenation -> the head's first layer, box edge to box edge
    return png(fig)


def time_spent(parts: dict[str, float]) -> bytes:
    """Seconds per stage as horizontal bars."""
    plt = _plt()
    names = list(parts)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 0.9))
    palette = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd"]
    bars = ax.barh(names, [parts[n] for n in names], color=[palette[i % len(palette)] for i in range(len(names))])
    ax.bar_label(bars, [f"{parts[n]:.1f} s" for n in names], fontsize=8, padding=3)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.margins(x=0.2)
    fig.tight_layout()
    return png(fig)
